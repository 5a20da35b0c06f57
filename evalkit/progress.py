"""Progress for long stages, in a terminal and in a notebook.

Messages go through ``logging.getLogger("evalkit")`` (the CLI prints them on stdout; a
library user chooses with ``logging``). Bars come from tqdm: a widget in Jupyter when
ipywidgets is installed (none without it: tqdm's text fallback shows as a red stderr block),
and in a terminal only when stderr is a terminal, so CI logs and pipes stay clean.
"""
from __future__ import annotations

import contextlib
import sys

#: Bars below this many steps are noise.
MIN_STEPS = 2


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except AttributeError:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


@contextlib.contextmanager
def progress_bar(total: int, desc: str, *, unit: str = "it", min_total: int = MIN_STEPS):
    """A tqdm bar (or a silent stand-in) for ``total`` steps; use ``bar.update(n)``."""
    show = total >= min_total and (in_notebook() or sys.stderr.isatty())
    if not show:
        yield _Silent()
        return
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401  (tqdm's notebook bar needs it)
            from tqdm.notebook import tqdm
        except ImportError:  # a text bar in a notebook is a red stderr block: better none
            yield _Silent()
            return
    else:
        from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass
