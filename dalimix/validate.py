"""Argument checks shared by every public constructor: each raises ValueError naming the argument,
the value given and what is expected, so no bad value slips through as a TypeError deep inside."""

from __future__ import annotations

import math
import numbers

import numpy as np


def _describe(lo, hi, lo_open, hi_open) -> str:
    if lo is None and hi is None:
        return "a number"
    if hi is None:
        return f"a number {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"a number {'<' if hi_open else '<='} {hi}"
    return f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def number(name: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, hint: str = "") -> float:
    """A finite real number (bools refused) within the bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        raise ValueError(f"{name}={value!r}: {_describe(lo, hi, lo_open, hi_open)}{hint}")
    return float(value)


def integer(name: str, value, *, lo=None, hi=None, hint: str = "") -> int:
    """An int (numpy ints accepted, bools and floats refused) within [lo, hi]."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok:
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ValueError(f"{name}={value!r}: an int{rng}{hint}")
    return int(value)


def pair(name: str, value, *, lo=None, hi=None, lo_open: bool = False, ordered: bool = True, hint: str = "") -> tuple[float, float]:
    """Two finite numbers within the bounds, ``min <= max`` when ``ordered``."""
    try:
        a, b = value
        a = number(name, a, lo=lo, hi=hi, lo_open=lo_open)
        b = number(name, b, lo=lo, hi=hi, lo_open=lo_open)
    except (TypeError, ValueError):
        a = b = None
    if a is None or (ordered and a > b):
        bounds = _describe(lo, hi, lo_open, False).replace("a number", "numbers")
        raise ValueError(f"{name}={value!r}: a pair (min, max) of {bounds}{', min <= max' if ordered else ''}{hint}")
    return a, b


def size(name: str, value, *, lo: int = 1, hint: str = "") -> tuple[int, int]:
    """An int ``s`` (-> ``(s, s)``) or a ``(height, width)`` pair of ints, each >= ``lo``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        pair = value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        pair = (value, value)
    else:
        pair = None
    try:
        return tuple(integer(name, s, lo=lo) for s in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: an int or (height, width) of ints >= {lo}{hint}") from None


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r}: True or False")
    return bool(value)


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}={value!r}: one of {', '.join(map(repr, options))}")
    return value
