"""environment.yml and pyproject.toml describe the same environment."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _names(specs):
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower(): s.replace(" ", "") for s in specs}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    have = _names(p for p in pip if not p.startswith("-e"))
    assert have == _names(wanted), "environment.yml pip list and pyproject.toml (with extras) differ"
    assert "-e ." in pip
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    low = project["requires-python"].lstrip(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, low.split(".")))
