"""Reading what `fracgpu top`, `fracgpu gpus` and the demo print: borderless tables, a header line and one
line per row, columns two spaces or more apart."""

from __future__ import annotations

import re

GAP = re.compile(r"\s{2,}")


def cells(line: str) -> list[str]:
    return GAP.split(line.strip())


# The first header of each table these commands print; a line that starts with one begins a table.
FIRST_HEADERS = ("partition", "pid", "index", "job")


def tables(text: str, first_header: str) -> list[list[dict[str, str]]]:
    """Each table whose header line starts with ``first_header`` (one of FIRST_HEADERS), as its rows
    (header -> cell); a table ends at another table's header or a line with another number of cells."""
    found: list[tuple[str, list[dict[str, str]]]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        parts = cells(line)
        if parts and parts[0] in FIRST_HEADERS and len(parts) > 1:
            header = parts
            found.append((parts[0], []))
        elif header is not None and len(parts) == len(header):
            found[-1][1].append(dict(zip(header, parts)))
        else:
            header = None
    return [rows for first, rows in found if first == first_header]
