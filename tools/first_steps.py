"""The README's "First steps": its commands, run as a new user runs them, and the output they print.

The block between ``<!-- first-steps:begin -->`` and ``<!-- first-steps:end -->`` is a
``console`` transcript: ``$ COMMAND`` lines, each followed by what it printed. ``COMMANDS`` are
those commands; ``run()`` runs them in one shell, as written, in a fresh folder with its own state,
ledger and simulated GPU (``XDG_RUNTIME_DIR``, ``XDG_STATE_HOME``), at 120 columns, and returns
each one's output (stdout and stderr as a terminal interleaves them).

    python tools/first_steps.py           # run them and rewrite the block in README.md
    python tools/first_steps.py --check   # exit 1 when README.md's block is not what they print now

Figures that differ from run to run (times, pids, UUIDs, sizes, measured shares) are compared
without their value (``normalized``), and the lines of one command's output in any order (jobs
started together reach the GPU in any order); the words, rows and columns must be the same.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

if __package__:              # imported as tools.<name>, as the tests do
    from tools import readme_block
else:                        # run as python tools/<name>.py
    import readme_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- first-steps:begin -->", "<!-- first-steps:end -->"
COLUMNS = 120

# The commands as the README shows them, in order; one shell runs them all.
COMMANDS = [
    "fracgpu demo",
    'eval "$(fracgpu sim env --memory 4GiB)"',
    "fracgpu run --memory 1GiB --name train --label team=vision -- python examples/train.py --batch 2GiB",
    "fracgpu run --memory 768MiB --compute 25% --name serve -- python examples/serve.py --requests 1000 > serve.log &",
    "until grep -qs serving serve.log; do sleep 0.2; done",
    "fracgpu top --once",
    "wait; cat serve.log",
    "fracgpu report",
]
MARK = "@@first-steps@@"


def run(timeout: float = 300) -> list[str]:
    """Each command's output, run in order by one bash, in a folder of its own that has ``examples/``."""
    with tempfile.TemporaryDirectory(prefix="fracgpu-first-steps-") as folder:
        shutil.copytree(ROOT / "examples", pathlib.Path(folder) / "examples")
        script = "exec 2>&1\n" + "".join(f"printf '%s\\n' '{MARK}'\n{command}\n" for command in COMMANDS)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FRACGPU_", "CUDA_VISIBLE_DEVICES")) and k not in ("LD_PRELOAD",)}
        env.update(XDG_RUNTIME_DIR=os.path.join(folder, "run"), XDG_STATE_HOME=os.path.join(folder, "state"),
                   COLUMNS=str(COLUMNS), PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
        os.mkdir(env["XDG_RUNTIME_DIR"], 0o700)
        result = subprocess.run(["bash", "-e", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"the first steps failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
        outputs = result.stdout.split(MARK + "\n")[1:]
        return [re.sub(r"[ \t]+$", "", text, flags=re.M).rstrip("\n") for text in outputs]


def transcript(outputs: list[str]) -> str:
    """The ``console`` block: each command after ``$ ``, then its output."""
    lines = []
    for command, output in zip(COMMANDS, outputs):
        lines.append(f"$ {command}")
        if output:
            lines.append(output)
    return "\n".join(lines)


def block(outputs: list[str]) -> str:
    return f"{BEGIN}\n```console\n{transcript(outputs)}\n```\n{END}"


def shown() -> str:
    """The transcript the README holds now."""
    text = (ROOT / "README.md").read_text()
    inner = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return inner.strip().removeprefix("```console").removesuffix("```").strip("\n")


def normalized(text: str) -> list[str]:
    """``text`` with what changes from run to run made the same: a GPU's UUID, each figure with its unit
    and sign (times, pids, sizes, shares, drifts), runs of spaces and of a table's rule characters;
    blank lines dropped."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "GPU-<uuid>", line)
        line = re.sub(r"[+-]?\d+(\.\d+)?( ?(B|KiB|MiB|GiB|TiB|ms|s|%)(?![\w.]))?", "#", line)
        line = re.sub(r"([─━═┄ ])\1+", r"\1", line).strip()
        if line:
            out.append(line)
    return out


def commands_shown() -> list[tuple[str, list[str]]]:
    """The README's transcript as (command, its output lines), in order."""
    out: list[tuple[str, list[str]]] = []
    for line in shown().splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def differences(outputs: list[str]) -> list[str]:
    """How ``outputs`` (``run()``) differ from what the README shows, command by command; empty when
    they agree. Within one command's output the lines are compared in any order (jobs started
    together are listed in the order they reached the GPU); each must be there, as often."""
    from collections import Counter

    shown_now = commands_shown()
    problems = []
    if [c for c, _ in shown_now] != COMMANDS:
        problems.append(f"the README's commands are {[c for c, _ in shown_now]}, not {COMMANDS}")
    for (command, lines), output in zip(shown_now, outputs):
        want, got = Counter(normalized("\n".join(lines))), Counter(normalized(output))
        if want != got:
            problems.append(f"$ {command}\n  shown, not printed: {sorted((want - got).elements())}\n"
                            f"  printed, not shown: {sorted((got - want).elements())}")
    return problems


def main(argv: list[str]) -> int:
    outputs = run()
    if "--check" in argv:
        if differences(outputs):
            print("README.md's First steps are not what the commands print: run python tools/first_steps.py",
                  file=sys.stderr)
            return 1
        return 0
    return readme_block.main(argv, BEGIN, END, lambda: block(outputs), "")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
