"""The one exception type that means "the user gave us something wrong"."""
from __future__ import annotations

import difflib
from typing import Iterable


class EvalkitError(Exception):
    """A user mistake: the CLI shows it as one line on stderr and exits with code 2."""


class InputError(EvalkitError, ValueError):
    """Invalid input to a neighbour, kernel or score function.

    A ``ValueError`` for library users, and an :class:`EvalkitError` so the command line
    reports it as one line with exit code 2.
    """


def closest(name: str, choices: Iterable[str], n: int = 3, *, cutoff: float = 0.5,
            substrings: bool = True) -> list[str]:
    """The valid names nearest to a misspelt ``name`` (best first).

    A case-insensitive exact match wins outright; then difflib's ratio (at least ``cutoff``);
    then, when ``substrings``, names that contain ``name`` or are contained in it.
    """
    choices = [str(c) for c in choices]
    lowered = name.lower()
    same_case = [c for c in choices if c.lower() == lowered]
    if same_case:
        return same_case[:1]
    found = difflib.get_close_matches(name, choices, n=n, cutoff=cutoff)
    if not found and substrings:
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
