"""A generated block of README.md: the lines between a ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` pair.

The README scripts (``faults_table.py``, ``settings_table.py``) write their table
with ``main``; with ``--check`` it only says whether README.md holds it already.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv: list[str], begin: str, end: str, block: Callable[[], str], stale: str,
         readme: pathlib.Path = ROOT / "README.md") -> int:
    """Rewrite the block of ``readme`` between ``begin`` and ``end`` with ``block()`` (which
    includes those lines); with ``--check`` in ``argv``, print ``stale`` and return 1 when it differs."""
    text = readme.read_text()
    if begin not in text or end not in text:
        print(f"{readme} has no {begin} ... {end} block", file=sys.stderr)
        return 1
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = head + block() + tail
    if "--check" in argv:
        if new != text:
            print(stale, file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0
