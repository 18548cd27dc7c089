"""Argparse ``type=`` functions shared by every command: a bad value is refused while the command line is
parsed, before anything is read, trained or written (argparse prints ``argument --OPTION: MESSAGE`` and exits
with status 2). Each message says what the option needs and what was given.

Numbers: :func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`, :func:`non_negative_float`,
:func:`finite_float`, :func:`fraction`, :func:`int_range`, :func:`float_range`; time: :func:`duration` (``90s``,
``15m``, ``12h``, a bare number of minutes; parsed by :func:`parse_duration`); paths: :func:`existing_file`,
:func:`existing_folder` (a file given for a folder is named as such, not as missing).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spinediff.errors import SpineDiffError

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def _number(text: str, kind: type, need: str) -> float | int:
    try:
        value = kind(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r} (not a finite number)")
    return value


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (counts: epochs, steps, iterations, workers, cases)."""
    value = _number(text, int, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number ≥ 0 (indices, seeds, counts where 0 means none)."""
    value = _number(text, int, "a whole number of at least 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (NaN and infinities refused)."""
    return _number(text, float, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, spacings, memory)."""
    value = _number(text, float, "a finite number greater than 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0 (tolerances, maximal offsets)."""
    value = _number(text, float, "a finite number of at least 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text!r}")
    return value


def _bounded(kind: type, low, high, need: str, name: str) -> Callable[[str], Any]:
    """A number of ``kind`` in ``[low, high]``, refused with "must be ``need``"."""

    def parse(text: str):
        value = _number(text, kind, need)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


def float_range(low: float, high: float) -> Callable[[str], float]:
    """A finite number in ``[low, high]``."""
    return _bounded(float, low, high, f"a number from {low:g} to {high:g}", f"float_from_{low:g}_to_{high:g}")


def fraction(text: str) -> float:
    """A probability or share in ``[0, 1]``."""
    return float_range(0.0, 1.0)(text)


def int_range(low: int, high: int) -> Callable[[str], int]:
    """A whole number in ``[low, high]``."""
    return _bounded(int, low, high, f"a whole number from {low} to {high}", f"int_from_{low}_to_{high}")


# ---------------------------------------------------------------------------------------------- durations
def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """``"20m"``, ``"12h"``, ``"90s"``, ``"1.5h"`` or a bare number of minutes → seconds (> 0)."""
    if isinstance(text, (int, float)):
        seconds = float(text) * 60.0
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
        if not match or match.group(2) not in ("", *_UNITS):
            raise SpineDiffError(f"Cannot read the {what} {text!r}: write a number with a unit, e.g. 90s, 20m, "
                                 "1.5h (a bare number means minutes).")
        seconds = float(match.group(1)) * (_UNITS[match.group(2)] if match.group(2) else 60.0)
    if not (math.isfinite(seconds) and seconds > 0):
        raise SpineDiffError(f"The {what} must be positive, got {text!r}.")
    return seconds


def _seconds_text(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def duration(minimum_seconds: float = 0.0, why: str = "") -> Callable[[str], str]:
    """A time such as ``90s``, ``15m``, ``12h`` (a bare number: minutes), at least ``minimum_seconds``.

    Returns the text as given (the commands and the API read it with :func:`parse_duration`)."""

    def parse(text: str) -> str:
        try:
            seconds = parse_duration(text, "budget")
        except SpineDiffError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if seconds < minimum_seconds:
            raise argparse.ArgumentTypeError(
                f"{text!r} is too short: give at least {_seconds_text(minimum_seconds)}{why}")
        return text

    parse.__name__ = "duration"
    return parse


def minutes(minimum: float = 0.0, why: str = "") -> Callable[[str], float]:
    """A number of minutes > 0 (and ≥ ``minimum``)."""

    def parse(text: str) -> float:
        value = positive_float(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is too short: give at least {minimum:g} minutes{why}")
        return value

    parse.__name__ = "minutes"
    return parse


# ---------------------------------------------------------------------------------------------- paths
def existing_file(text: str) -> Path:
    """A path that exists and is a file (a folder is named as a folder, not as missing)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path)!r} is a folder, not a file: give the file itself")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{str(path)!r} does not exist")
    return path


def existing_folder(text: str) -> Path:
    """A path that exists and is a folder (a file is named as a file, not as missing)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path)!r} is a file, not a folder: give the folder that holds it")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{str(path)!r} does not exist")
    return path


def folder_or_new(text: str) -> Path:
    """An output folder: it may not exist yet, but a file of that name is refused."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path)!r} is a file, not a folder: choose a folder name")
    return path


def file_or_new(text: str) -> Path:
    """An output file: it may not exist yet, but a folder of that name is refused (it could not be written)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path)!r} is a folder, not a file: give the file name to write")
    return path


def fold(text: str) -> str:
    """A fold of a cross-validation: a whole number >= 0, or ``all`` (whether the split has it is checked before
    any work, where the split is known)."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fold: give 0, 1, 2, ... or 'all'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fold: folds are numbered from 0 (or 'all')")
    return str(value)


_CASE_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*(_[A-Za-z0-9.-]+)*$")


def case_identifier(text: str) -> str:
    """A case identifier nnU-Net can name files by: letters, digits, '.', '-' and single '_' between them, not
    ending in a 4-digit channel suffix (``_0000``) and no path separators."""
    if not _CASE_IDENTIFIER.match(text) or re.search(r"_\d{4}$", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a case identifier: use letters, digits, '.', '-' and '_' (no '/', no leading '.', "
            "not ending in _NNNN, which nnU-Net reads as a channel)")
    return text
