"""Progress bars that suit the place they are shown in (no paper equations here).

:func:`tqdm` takes tqdm's arguments and returns, by :func:`mode`:

- ``"bar"``: ``tqdm.auto.tqdm``: a widget in JupyterLab, a bar redrawn in place in a terminal;
- ``"log"``: :class:`LogLines`: one plain line per finished item (per epoch for the training
  loops), without timings, so that logs stay short and papermill's captured output is the same
  on every run; bars with ``leave=False`` (per-batch bars inside an epoch) print nothing.

The mode is ``$NFPI_PROGRESS`` (``bar`` or ``log``; ``make reproduce`` sets ``log``) if set, else
``bar`` inside a Jupyter kernel or when stderr is a terminal, else ``log`` (redirected output).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm as _auto_tqdm

__all__ = ["ENV_VAR", "LogLines", "mode", "tqdm"]

ENV_VAR = "NFPI_PROGRESS"
MODES = ("bar", "log")
# Bars longer than this print a line every len/10 items rather than for each one.
MAX_LINES = 100


def _in_jupyter_kernel() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return type(ip).__name__ == "ZMQInteractiveShell"


def mode() -> str:
    """``"bar"`` or ``"log"`` (see the module docstring)."""
    chosen = os.environ.get(ENV_VAR, "").strip().lower()
    if chosen:
        if chosen not in MODES:
            raise ValueError(
                f"{ENV_VAR}={chosen!r} is not a progress mode; use one of {list(MODES)} or unset it"
            )
        return chosen
    return "bar" if _in_jupyter_kernel() or sys.stderr.isatty() else "log"


class LogLines:
    """A tqdm stand-in writing ``desc n/total key=value ...`` to stderr as items finish.

    Supports what nfpi's loops use: iteration, ``update``, ``set_postfix`` and ``close``.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str | None = None,
        total: int | None = None,
        initial: int = 0,
        leave: bool = True,
        disable: bool = False,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        self.desc = desc or ""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)
        self.total, self.n = total, initial
        self.silent = disable or not leave
        self.every = 1 if total is None or total <= MAX_LINES else math.ceil(total / 10)
        self.postfix: dict[str, Any] = {}

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.silent or (self.n % self.every and self.n != self.total):
            return
        of = f"/{self.total}" if self.total is not None else ""
        values = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc} {self.n}{of}{values}".strip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def tqdm(iterable: Iterable | None = None, **kwargs: Any) -> _auto_tqdm | LogLines:
    """A progress bar over ``iterable`` with tqdm's keyword arguments, suited to :func:`mode`."""
    if mode() == "log":
        return LogLines(iterable, **kwargs)
    return _auto_tqdm(iterable, **kwargs)
