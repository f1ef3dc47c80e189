"""Working in JupyterLab: executed notebooks without volatile metadata (nfpi._notebooks), and
the round trip "open and save every notebook through the Jupyter server" leaving every file of
the pairs byte-identical (jupytext.toml, kernelspec, stripped metadata all agree)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jupytext
import nbformat
import pytest

from nfpi import _notebooks

REPO = Path(__file__).resolve().parents[1]
PAIRS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))


def executed_like_papermill(source: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(source)
    nb.metadata["papermill"] = {"duration": 1.5, "start_time": "2026-01-01T00:00:00"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for i, cell in enumerate(nb.cells):
        cell.metadata["papermill"] = {"duration": 0.1 * i, "status": "completed"}
        cell.metadata["execution"] = {"iopub.execute_input": f"2026-01-01T00:00:0{i % 10}Z"}
    return nb


def test_strip_removes_volatile_metadata_and_pins_the_kernel(tmp_path: Path) -> None:
    nb = executed_like_papermill(PAIRS[0])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    out = _notebooks.strip(nb)
    assert not {"papermill", "widgets"} & set(out.metadata)
    assert out.metadata.kernelspec == _notebooks.KERNELSPEC
    assert not any({"papermill", "execution"} & set(c.metadata) for c in out.cells)
    assert [c.metadata.get("tags") for c in out.cells] == [
        c.metadata.get("tags") for c in jupytext.read(PAIRS[0]).cells
    ]


def test_finish_rewrites_only_on_change_and_orders_the_pair(tmp_path: Path) -> None:
    source, target, run = tmp_path / "nb.py", tmp_path / "nb.ipynb", tmp_path / "run.ipynb"
    shutil.copy(PAIRS[0], source)
    nbformat.write(executed_like_papermill(source), run)
    assert _notebooks.finish(run, target, source)
    first = target.read_bytes()
    ids = [c.id for c in nbformat.read(target, as_version=4).cells]
    os.utime(target, (1, 1))
    os.utime(source, (0, 0))
    # A re-run with new timestamps and new random cell ids (jupytext) but the same results.
    nb = executed_like_papermill(source)
    nb.metadata["papermill"]["duration"] = 99.0
    nbformat.write(nb, run)
    assert not _notebooks.finish(run, target, source)
    assert target.read_bytes() == first and target.stat().st_mtime == 1
    assert source.stat().st_mtime > target.stat().st_mtime  # jupytext opens the pair
    assert [c.id for c in nbformat.read(target, as_version=4).cells] == ids
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="new result\n")]
    nbformat.write(nb, run)
    assert _notebooks.finish(run, target, source) and b"new result" in target.read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A Jupyter server (with the jupytext contents manager JupyterLab uses) on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.token = secrets.token_hex(16)
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}/api/contents/"
        env = {
            **os.environ,
            "JUPYTER_RUNTIME_DIR": str(root.parent / "runtime"),
            "JUPYTER_CONFIG_DIR": str(root.parent / "config"),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={root}",
                "--no-browser",
                "--allow-root",
            ],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                self.call("GET", "")
                return
            except (urllib.error.URLError, ConnectionError) as err:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(
                        f"jupyter server did not start: {self.proc.stderr.read().decode()[-2000:]}"
                    ) from err
                time.sleep(0.25)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.slow
def test_open_and_save_in_jupyterlab_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(REPO / "jupytext.toml", root)
    shutil.copytree(REPO / "notebooks", root / "notebooks")  # copy2 keeps the pairs' mtimes
    before = {p: p.read_bytes() for p in (root / "notebooks").iterdir() if p.is_file()}
    server = _Server(root)
    try:
        for source in PAIRS:
            # JupyterLab's open (GET) and save (PUT), of the .ipynb and of the .py opened as a notebook.
            for name in (source.with_suffix(".ipynb").name, source.name):
                model = server.call("GET", f"notebooks/{name}?type=notebook&content=1")
                server.call(
                    "PUT",
                    f"notebooks/{name}",
                    {"type": "notebook", "format": "json", "content": model["content"]},
                )
    finally:
        server.close()
    after = {p: p.read_bytes() for p in (root / "notebooks").iterdir() if p.is_file()}
    assert sorted(after) == sorted(before)
    changed = [p.name for p in before if after[p] != before[p]]
    assert not changed, f"saving in JupyterLab rewrites {changed}: run `make reproduce`"
