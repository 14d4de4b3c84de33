"""The README's billing walk-through: a ledger of known jobs, and what ``fracgpu report`` prints for it.

The ledger is filled through the library (``fracgpu.ledger``) with the jobs of
a small team's November on one GPU: a training job whose partition was resized
in the middle, an inference job in a private partition, and a best-effort
notebook. The commands run for real, in UTC at 80 columns, and their output is
written between the README's ``<!-- billing:begin -->`` and ``<!-- billing:end -->``
lines.

    python tools/billing_example.py           # rewrite the block in README.md
    python tools/billing_example.py --check   # exit 1 when README.md's block is not what the commands print
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

if __package__:              # imported as tools.<name>, as the tests do
    from tools import readme_block
else:                        # run as python tools/<name>.py
    import readme_block

BEGIN, END = "<!-- billing:begin -->", "<!-- billing:end -->"
GiB = 1 << 30
GPU = "GPU-5f1c2a9e-7d43-4b8e-9a61-0c3e2f8d1b47"
COMMANDS = [
    "fracgpu report --since 2026-11-01 --until 2026-12-01 --by label:team --price-reserved-gpu-hour 2.40 "
    "--price-reserved-gib-hour 0.01 --price-used-gpu-hour 1.20 --currency EUR --output november.csv",
    "cut -d, -f1,2,9,11,17,18,20,22 november.csv | head -7",
]


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text + "+00:00").timestamp()


def fill(path: pathlib.Path) -> None:
    """The example's jobs, each sampled at its start, where its limits changed, and at its end."""
    from fracgpu.ledger import GPUSample, Ledger, Limits

    def job(ledger, name, partition, uid, user, team, spans, end):
        """``spans``: (start, limits, memory held, device seconds by the end of it) in time order."""
        first = at(spans[0][0])
        job_id = ledger.start_job(job=name, partition=partition, start=first, uid=uid, user=user, host="gpu-node-1",
                                  labels={"team": team}, command=f"python {name}.py")
        device = 0.0
        for when, limits, memory, used in spans:
            if when != spans[0][0]:
                ledger.record_change(GPU, partition, limits, t=at(when))
            ledger.sample(job_id, memory_bytes=memory, device_seconds=device, t=at(when),
                          gpus={GPU: GPUSample(limits, memory, device, since=first)})
            device = used
        ledger.sample(job_id, memory_bytes=spans[-1][2], device_seconds=device, t=at(end),
                      gpus={GPU: GPUSample(spans[-1][1], spans[-1][2], device)})
        ledger.finish(job_id, exit_status=0, end=at(end))

    with Ledger(path) as ledger:
        ledger.note_gpu(GPU, "NVIDIA A100-SXM4-40GB", 40 * GiB)
        # `fracgpu partition set vision --memory 24GiB --compute 75%` at 13:00.
        job(ledger, "train", "vision", 1001, "alice", "vision",
            [("2026-11-03T09:00", Limits(16 * GiB, 0.5), 12 * GiB, 6480.0),
             ("2026-11-03T13:00", Limits(24 * GiB, 0.75), 20 * GiB, 6480.0 + 9360.0)], "2026-11-03T17:00")
        job(ledger, "infer", "run-4242", 1002, "bob", "search",
            [("2026-11-04T10:00", Limits(8 * GiB, 0.25), 6 * GiB, 1080.0)], "2026-11-04T12:00")
        job(ledger, "notebook", "lab", 1003, "carol", "vision",
            [("2026-11-05T14:00", Limits(4 * GiB, None, best_effort=True), 2 * GiB, 360.0)], "2026-11-05T15:30")


def block() -> str:
    with tempfile.TemporaryDirectory() as folder:
        fill(pathlib.Path(folder) / "ledger.sqlite")
        env = {**os.environ, "TZ": "UTC", "COLUMNS": "80",
               "FRACGPU_LEDGER": str(pathlib.Path(folder) / "ledger.sqlite"),
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        lines = [BEGIN, "```console"]
        for command in COMMANDS:
            argv = command if not command.startswith("fracgpu") else \
                shlex.join([sys.executable, "-m", "fracgpu", *shlex.split(command)[1:]])
            out = subprocess.run(argv, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"{command} exited {out.returncode}: {out.stderr}")
            lines += [f"$ {command}", *(line.rstrip() for line in (out.stderr + out.stdout).splitlines())]
        lines += ["```", END]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return readme_block.main(argv, BEGIN, END, block, "README.md's billing walk-through is not what the commands "
                             "print: run python tools/billing_example.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
