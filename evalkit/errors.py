"""The one exception type that means "the user gave us something wrong"."""
from __future__ import annotations

import difflib
from typing import Iterable


class EvalkitError(Exception):
    """A user mistake: the CLI shows it as one line on stderr and exits with code 2."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to a misspelt ``name`` (best first)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        lowered = name.lower()
        found = [c for c in choices if lowered and (lowered in c.lower() or c.lower() in lowered)][:n]
    return found


def unknown(kind: str, name: str, choices: Iterable[str], *, limit: int = 12) -> EvalkitError:
    """An error for an unknown name that lists the closest valid ones."""
    choices = sorted(set(choices))
    near = closest(name, choices)
    hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    if len(choices) <= limit:
        valid = ", ".join(choices)
    else:
        valid = ", ".join(choices[:limit]) + f", ... ({len(choices)} in all)"
    return EvalkitError(f"unknown {kind} {name!r}{hint} (valid: {valid})")
