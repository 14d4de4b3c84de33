"""Sizes, shares, priorities and seconds in the forms people write: ``"4GiB"``, ``"25%"``, ``0.25``, ``"2.5"``.

Parsing is done by the same C code the CUDA shim and the simulated driver use
for ``FRACGPU_*`` variables, so a value is read the same way on the command
line and in a job.
"""

from __future__ import annotations

import math

from fracgpu import _native

__all__ = ["parse_size", "parse_memory", "parse_share", "parse_priority", "parse_seconds", "bytes_of", "format_size",
           "format_share", "percent_text", "PRIORITIES"]

SIZE_FORMS = (
    "write a byte count like 1048576, a size like 512MiB, 4GiB or 4GB "
    "(K/Ki/KiB, M/Mi/MiB, G/Gi/GiB, T/Ti/TiB are powers of 1024; KB, MB, GB, TB powers of 1000; "
    "B is bytes; any case), or a percentage of the device like 25%"
)
SHARE_FORMS = "write a percentage like 25% or a fraction like 0.25"

_MAX_BYTES = 2**63 - 1


def parse_size(value: str | int, device_total: int | None = None, *, allow_zero: bool = False) -> int:
    """Bytes from ``"4GiB"``, ``"4GB"``, ``"1048576"``, a positive int, or ``"25%"``.

    A percentage is of ``device_total`` bytes (rounded down), which it needs.
    Zero is an error unless ``allow_zero`` (then any zero size: ``"0"``, ``"0MiB"``, the rule of
    the settings whose zero means none). Raises ValueError naming the input
    and the accepted forms.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"a size must be a str or an int, not {type(value).__name__}; {SIZE_FORMS}")
    if isinstance(value, int):
        if allow_zero and value == 0:
            return 0
        if not 0 < value <= _MAX_BYTES:
            raise ValueError(f"invalid size {value}: it must be at least 1 byte and below 2^63; {SIZE_FORMS}")
        return value
    return bytes_of(_native.parse_size(value, allow_zero), device_total, value)


def bytes_of(memory: tuple[int, float], device_total: int | None, shown: str | int = "") -> int:
    """Bytes of a parsed size (``parse_memory``'s (bytes, 0.0) or (0, fraction)) on a device of
    ``device_total`` bytes, which a percentage needs (rounded down). ``shown``: the size as written."""
    size, fraction = memory
    if not fraction:
        return size
    if device_total is None:
        raise ValueError(
            f"invalid size {shown!r}: a percentage of the device needs the device's memory size; "
            "write an absolute size like 4GiB instead"
        )
    if isinstance(device_total, bool) or not isinstance(device_total, int) or device_total <= 0:
        raise ValueError(f"device_total must be a positive number of bytes, not {device_total!r}")
    size = math.floor(fraction * device_total)
    if size <= 0:
        raise ValueError(f"invalid size {shown!r}: it is less than one byte of a {device_total}-byte device")
    return size


def parse_memory(memory: str | int) -> tuple[int, float]:
    """A memory limit before the device is known: (bytes, 0.0) for a size, (0, fraction) for a
    percentage of each device. Raises ValueError/TypeError naming the forms."""
    if isinstance(memory, str):
        return _native.parse_size(memory)
    return parse_size(memory), 0.0


def parse_share(value: str | float) -> float:
    """A fraction in (0, 1] from ``"25%"``, ``"0.25"`` or a number such as ``0.25``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"a share must be a str or a number, not {type(value).__name__}; {SHARE_FORMS}")
    if isinstance(value, str):
        return _native.parse_share(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid share {value!r}: it must be above 0; {SHARE_FORMS}")
    if value > 1:
        # Most likely a percentage without its sign, as the C parser says too.
        hint = f"write {value:g}% or {value / 100:g}" if value <= 100 else SHARE_FORMS
        raise ValueError(f"invalid share {value!r}: a share without % is a fraction of at most 1; {hint}")
    return float(value)


PRIORITIES = ("high", "normal", "low")   # the priority classes, as written, in the order they are served


def parse_priority(value: str) -> str:
    """``"high"``, ``"normal"`` or ``"low"`` (as given); ValueError naming the accepted values."""
    if not isinstance(value, str):
        raise TypeError(f"a priority must be a str, not {type(value).__name__}: write high, normal or low")
    _native.parse_priority(value)
    return value


def parse_seconds(value: str | float | int) -> float:
    """Seconds from text such as ``"30"`` or ``"2.5"`` (the shim's grammar: no sign, exponent or
    hexadecimal), or a number: finite and >= 0. Raises ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"seconds must be a number, not {type(value).__name__}")
    if isinstance(value, str):
        return _native.parse_seconds(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid seconds {value!r}: give seconds, a number >= 0 like 30 or 2.5")
    return float(value)


def format_size(size: int) -> str:
    """``268435456`` -> ``"256MiB"``, ``1610612736`` -> ``"1.5GiB"``, ``1000`` -> ``"1000B"``."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"format_size needs an int number of bytes, not {type(size).__name__}")
    if not 0 <= size < 2**64:
        raise ValueError(f"format_size needs a byte count from 0 to 2^64-1, not {size}")
    return _native.format_size(size)


def format_share(share: float) -> str:
    """``0.25`` -> ``"25%"``, ``0.125`` -> ``"12.5%"`` (at most two decimals)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise TypeError(f"format_share needs a number, not {type(share).__name__}")
    return _native.format_share(float(share))


def percent_text(fraction: float) -> str:
    """A fraction of the GPU as a job's ``--memory``/``--compute`` text: a percentage to 0.0001%
    (``0.25`` -> ``"25%"``, ``1/3`` -> ``"33.3333%"``), finer than ``format_share``'s display."""
    return f"{fraction * 100:.4f}".rstrip("0").rstrip(".") + "%"
