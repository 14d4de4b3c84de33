"""The README's table of faults and bad inputs tried, generated from the tests.

Each test that tries a fault carries ``@pytest.mark.fault("what is done", "what
happens")``; this script reads them from the test sources (no test is run: the
tests themselves assert the outcomes, in CI) and writes the table between the
README's ``<!-- faults:begin -->`` and ``<!-- faults:end -->`` lines.

    python tools/faults_table.py           # rewrite the table in README.md
    python tools/faults_table.py --check   # exit 1 when README.md's table is not the generated one
"""

from __future__ import annotations

import ast
import pathlib
import sys

if __package__:              # imported as tools.<name>, as the tests do
    from tools import readme_block
else:                        # run as python tools/<name>.py
    import readme_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def faults(tests: pathlib.Path = ROOT / "tests") -> list[tuple[str, str, str]]:
    """(fault, outcome, test id) of every test marked with pytest.mark.fault, in file and line order."""
    out = []
    for path in sorted(tests.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "fault"
                        and len(deco.args) == 2 and all(isinstance(a, ast.Constant) for a in deco.args)):
                    fault, outcome = (a.value for a in deco.args)
                    out.append((fault, outcome, f"{path.relative_to(ROOT)}::{node.name}"))
    return out


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = [BEGIN, "| Fault or bad input | Outcome | Test |", "| --- | --- | --- |"]
    lines += [f"| {fault} | {outcome} | `{test}` |" for fault, outcome, test in rows]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return readme_block.main(argv, BEGIN, END, lambda: table(faults()), "README.md's faults table is not the one "
                             "the tests give: run python tools/faults_table.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
