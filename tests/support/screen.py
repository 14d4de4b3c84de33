"""Reading what `fracgpu top`, `fracgpu gpus` and the demo print: borderless tables, a header line and one
line per row, columns two spaces or more apart."""

from __future__ import annotations

import re

GAP = re.compile(r"\s{2,}")


def cells(line: str) -> list[str]:
    return GAP.split(line.strip())


def tables(text: str, *first_headers: str) -> list[list[dict[str, str]]]:
    """Each table whose header line starts with one of ``first_headers`` (e.g. "partition", "pid"), as
    its rows (header -> cell); a table ends at the first line with another number of cells."""
    found: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        parts = cells(line)
        if parts and parts[0] in first_headers and len(parts) > 1:
            header = parts
            found.append([])
        elif header is not None and len(parts) == len(header):
            found[-1].append(dict(zip(header, parts)))
        else:
            header = None
    return found
