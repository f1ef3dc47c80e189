"""The package's layout holds by construction: module and function sizes (the limits docs/testing.md
states), no import cycle, each subpackage's ``__init__`` as the only re-exporter and so one
import path per name, and a wheel that carries every subpackage."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nfpi"
# The limits docs/testing.md states, measured (the largest today: 502 and 60 lines).
MAX_MODULE_LINES = 510
MAX_FUNCTION_LINES = 60  # lines of code: without the docstring, blank and comment-only lines
SOURCES = sorted(PACKAGE.rglob("*.py"))
SUBPACKAGES = sorted(
    p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in PACKAGE.glob("*/__init__.py")
)
USERS = sorted(
    p
    for folder in ("nfpi", "tests", "notebooks", "scripts", "benchmarks")
    for p in (REPO / folder).rglob("*.py")
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES = {module_name(p): p for p in SOURCES}


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    first = node.body[0]
    doc = (
        range(first.lineno, first.end_lineno + 1)
        if isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
        else range(0)
    )
    return sum(
        1
        for i in range(node.lineno, node.end_lineno + 1)
        if i not in doc and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
    )


def test_module_and_function_sizes_stay_within_the_stated_limits():
    long_modules, long_functions = [], []
    for path in SOURCES:
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = function_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines (split by role): {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines of code: {long_functions}"


def _imports(path: Path, *, top_level_only: bool) -> list[tuple[ast.ImportFrom | ast.Import, str]]:
    """(node, absolute module) of every import in ``path`` outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if is_package(path) else here.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            found.append((node, ".".join([*base, *([node.module] if node.module else [])])))
        elif isinstance(node, ast.Import):
            found.extend((node, alias.name) for alias in node.names)
    return found


def _targets(node: ast.ImportFrom | ast.Import, module: str) -> list[str]:
    """The nfpi modules an import executes: a submodule for ``from pkg import sub``, else ``module``."""
    if not module.startswith("nfpi"):
        return []
    if isinstance(node, ast.ImportFrom):
        subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
        rest = [a for a in node.names if f"{module}.{a.name}" not in MODULES]
        return subs + ([module] if rest else [])
    return [module]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for node, module in _imports(path, top_level_only=False):
            graph[name] |= {t for t in _targets(node, module) if t != name}
    return graph


def test_there_is_no_import_cycle():
    graph = import_graph()
    assert all(t in graph for targets in graph.values() for t in targets), "an import names no nfpi module"
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_function_imports_nfpi():
    """Imports of the package sit at the top of each module: none hidden in a function."""
    local = []
    for path in SOURCES:
        top = {n.lineno for n, _ in _imports(path, top_level_only=True)}
        for node, module in _imports(path, top_level_only=False):
            if module.startswith("nfpi") and node.lineno not in top:
                local.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not local, f"function-local imports of nfpi modules: {local}"


def _all(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names += list(ast.literal_eval(node.value))
    return names


def _defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_only_a_subpackage_init_re_exports():
    """A module's ``__all__`` names what it defines; only an ``__init__`` lists imported names."""
    offenders = []
    for path in SOURCES:
        if is_package(path):
            continue
        tree = ast.parse(path.read_text())
        exported = _all(tree)
        assert exported or path.name in ("__main__.py", "conftest.py"), (
            f"{path.relative_to(REPO)} has no __all__"
        )
        foreign = sorted(set(exported) - _defined(tree))
        if foreign:
            offenders.append(f"{path.relative_to(REPO)} re-exports {foreign}")
    assert not offenders, offenders


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_a_subpackage_face_exports_what_it_imports(package):
    face = importlib.import_module(package)
    tree = ast.parse(MODULES[package].read_text())
    assert not _defined(tree) - {"__all__"}, f"{package}/__init__.py defines code; it only re-exports"
    assert len(set(face.__all__)) == len(face.__all__), f"{package}.__all__ names a name twice"
    for name in face.__all__:
        assert hasattr(face, name), f"{package}.__all__ names {name!r}, which it does not import"


def test_one_import_path_per_name():
    """Outside a subpackage, a name its ``__init__`` exports is imported from there, never from the
    module that defines it (nfpi, tests, notebooks, scripts, benchmarks)."""
    faces = {p: set(importlib.import_module(p).__all__) for p in SUBPACKAGES}
    offenders = []
    for path in USERS:
        inside = module_name(path) if path.is_relative_to(PACKAGE) else ""
        for node, module in _imports(path, top_level_only=False):
            if not isinstance(node, ast.ImportFrom):
                continue
            for face, names in faces.items():
                if module.startswith(face + ".") and not (inside + ".").startswith(face + "."):
                    doubled = sorted({a.name for a in node.names} & names)
                    if doubled:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {doubled} from {module}")
    assert not offenders, f"import these from the subpackage itself: {offenders}"


@pytest.mark.slow
def test_a_wheel_holds_and_imports_every_subpackage(tmp_path):
    """A non-editable build (what ``pip install .`` installs) finds every subpackage. Offline:
    setuptools from the environment, no build isolation, no index."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "nfpi", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("nfpi-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in SOURCES}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)], check=True
    )
    probe = (
        "import importlib, nfpi; "
        f"mods = {sorted(MODULES)!r}; "
        "[importlib.import_module(m) for m in mods if not m.endswith('__main__')]; "
        "print(nfpi.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    )
    assert Path(out.stdout.strip()).resolve().is_relative_to(site.resolve()), out.stdout
