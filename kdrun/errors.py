"""The exception kdrun raises for user mistakes: printed as one message, never as a traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdrunError(Exception):
    """A mistake in the user's input (config, data, checkpoint): its message says what and how to fix."""


def first_line(ex: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name."""
    text = str(ex).strip()
    return text.splitlines()[0][:limit] if text else type(ex).__name__


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option to ``name``, or ``""`` when none is close."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.6)
    if not close:
        # a prefix or containment match catches abbreviations such as 'temp' for 'temperature'
        close = [o for o in options if o.startswith(str(name)) or str(name) in o][:1]
    return f" Did you mean '{close[0]}'?" if close else ""
