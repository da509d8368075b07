"""Byte counts for people: the one formatter every memory message uses."""

from __future__ import annotations

import math

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n) -> str:
    """``n`` bytes with a binary unit and 3 significant digits: 0 B, 1000 B, 1.95 KiB,
    3.05 MiB, 22.9 GiB, 72.8 TiB. Negative and non-finite values are shown as given (a
    message about a bad budget must not hide it)."""
    n = float(n)
    if not math.isfinite(n):
        return f"{n} B"
    sign, n = ("-" if n < 0 else ""), abs(n)
    i = 0
    while n >= 1023.5 and i < len(_UNITS) - 1:  # what would round to 1024 moves up a unit
        n /= 1024
        i += 1
    if i == 0:
        return f"{sign}{n:.0f} B"
    text = f"{n:.3g}" if n < 1000 else f"{n:.0f}"  # 1000-1023 of a unit: no 1e+03
    return f"{sign}{text} {_UNITS[i]}"
