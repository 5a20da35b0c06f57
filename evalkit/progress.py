"""Progress for long stages, in a terminal and in a notebook.

Messages go through ``logging.getLogger("evalkit")`` (the CLI prints them on stdout; a
library user chooses with ``logging``). Bars come from tqdm: a widget in Jupyter when
ipywidgets is installed (none without it: tqdm's text fallback shows as a red stderr block),
and in a terminal only when stderr is a terminal, so CI logs and pipes stay clean.
"""
from __future__ import annotations

import contextlib
import sys
import threading

from evalkit.interrupt import check_interrupted

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


#: Bars of the inner loops (t-SNE iterations, UMAP epochs, blocks of the scoring pass) appear
#: only once their loop has run this long, so a quick step never flickers a bar.
INNER_DELAY_S = 2.0

_local = threading.local()  # the bar of this thread's current inner loop


@contextlib.contextmanager
def progress_bar(total: int, desc: str, *, unit: str = "it", min_total: int = MIN_STEPS, delay: float = 0.0):
    """A tqdm bar (or a silent stand-in) for ``total`` steps; use ``bar.update(n)``.

    ``delay``: seconds before the bar appears (tqdm's ``delay``); a loop done sooner shows none.
    """
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
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True, delay=delay)
    try:
        yield bar
    finally:
        bar.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def inner_loop(total: int, desc: str, *, unit: str = "it"):
    """A bar for a library's loop that reports through :func:`step` (an openTSNE callback,
    umap-learn's epoch kernel), for the thread that runs it: two embeddings side by side
    each get their own."""
    with progress_bar(total, desc, unit=unit, delay=INNER_DELAY_S) as bar:
        previous = getattr(_local, "bar", None)
        _local.bar = bar
        try:
            yield bar
        finally:
            _local.bar = previous


def step(n: int = 1) -> None:
    """``n`` steps of this thread's :func:`inner_loop` done; raises there if a Ctrl-C or
    SIGTERM was recorded (:func:`evalkit.interrupt.check_interrupted`)."""
    check_interrupted()
    bar = getattr(_local, "bar", None)
    if bar is not None:
        bar.update(n)
