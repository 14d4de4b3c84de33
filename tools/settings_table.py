"""The README's table of ``FRACGPU_*`` variables, generated from ``fracgpu.settings``.

Each row of ``fracgpu.settings.SETTINGS`` is one row of the table between the
README's ``<!-- settings:begin -->`` and ``<!-- settings:end -->`` lines.

    python tools/settings_table.py           # rewrite the table in README.md
    python tools/settings_table.py --check   # exit 1 when README.md's table is not the generated one
"""

from __future__ import annotations

import sys

if __package__:              # imported as tools.<name>, as the tests do
    from tools import readme_block
else:                        # run as python tools/<name>.py
    import readme_block

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def table() -> str:
    from fracgpu import settings

    lines = [BEGIN, "| Variable | Default | Read by | Meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{s.name}` | {s.default} | {s.reader} | {s.meaning} |" for s in settings.SETTINGS]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return readme_block.main(argv, BEGIN, END, table, "README.md's variables table is not the one "
                             "fracgpu.settings gives: run python tools/settings_table.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
