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


def default_text(setting) -> str:
    """The default as the README shows it: a value as it would be written (``16GiB``, ``1``), a rule
    in italics."""
    from fracgpu.units import format_size

    if setting.default_rule is not None:
        return f"*{setting.default_rule}*"
    if setting.grammar == "size":
        return format_size(setting.default)
    if setting.grammar == "flag":
        return "1" if setting.default else "0"
    if setting.grammar == "seconds":
        return f"{setting.default:g}"
    return str(setting.default)


def table() -> str:
    from fracgpu import settings

    lines = [BEGIN, "| Variable | Default | Read by | Meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{s.name}` | {default_text(s)} | {s.reader} | {s.meaning} |" for s in settings.SETTINGS]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return readme_block.main(argv, BEGIN, END, table, "README.md's variables table is not the one "
                             "fracgpu.settings gives: run python tools/settings_table.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
