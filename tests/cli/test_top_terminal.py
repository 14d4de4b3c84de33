"""`fracgpu top` on a real terminal (tmux) at the sizes people use: 80x24 and 120x40.

Four partitions and eight processes, each job started with `fracgpu run --name ... --label ...`:
the screen shows every process row with its job's name, every partition, the GPU by index, and
`q` ends the view with exit status 0."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.support import screen
from tests.support.simgpu import GiB, command_pid

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (.ci/run installs it: apt-get install tmux)")

PARTITIONS = ["vision", "speech", "ranking", "serving"]


@pytest.fixture
def busy_gpu(make_gpu, clients):
    """A 2GiB simulated GPU with four partitions and two recorded jobs in each, holding memory."""
    gpu = make_gpu(memory=2 * GiB)
    for name in PARTITIONS:
        gpu.fracgpu("partition", "create", name, "--memory", "256MiB")
    runs, names = [], {}
    for n in range(8):
        partition, job = PARTITIONS[n % 4], f"job-{n}"
        run = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", partition, "--name", job,
                        "--label", f"team={partition}", "--", clients.lcuda, "hold", 16 + n, 120)
        runs.append(run)
    try:
        for n, run in enumerate(runs):
            assert run.stdout.readline().strip() == f"holding {16 + n}"
            names[command_pid(run)] = f"job-{n}"
        yield gpu, names
    finally:
        for run in runs:
            run.kill()
            run.wait(timeout=10)


def capture(socket: str) -> str:
    return subprocess.run(["tmux", "-S", socket, "capture-pane", "-p", "-t", "top"], capture_output=True,
                          text=True, timeout=10).stdout


@pytest.mark.parametrize("width, height", [(80, 24), (120, 40)])
def test_top_in_a_terminal_shows_every_process_by_name_and_q_quits(busy_gpu, tmp_path, width, height):
    gpu, names = busy_gpu
    socket, status = str(tmp_path / "tmux.sock"), tmp_path / "status"
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in gpu.env.items() if k not in ("COLUMNS", "LINES"))
    command = (f"env -u COLUMNS -u LINES {exports} TERM=xterm-256color {shlex.quote(sys.executable)} -m fracgpu top --interval 0.3; "
               f"echo $? > {shlex.quote(str(status))}")
    subprocess.run(["tmux", "-S", socket, "-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", str(width),
                    "-y", str(height), command], check=True, timeout=30)
    try:
        deadline, shown = time.monotonic() + 30, ""
        while time.monotonic() < deadline:
            shown = capture(socket)
            (procs,) = screen.tables(shown, "pid") or [[]]
            if len(procs) == 8 and "compute over the last" in shown:
                break
            time.sleep(0.3)
        lines = shown.splitlines()
        assert len(lines) <= height and all(len(line) <= width for line in lines), shown
        (parts,), (procs,) = screen.tables(shown, "partition"), screen.tables(shown, "pid")
        assert sorted(r["partition"] for r in parts) == sorted(PARTITIONS), shown
        assert {int(r["pid"]): r["job"] for r in procs} == names, shown
        for row in procs:   # every process: its partition and memory, and the share it achieved
            assert row["partition"] in PARTITIONS and row["memory"].endswith("MiB") and "achieved" in row
        for row in parts:
            assert row["job"] == "2 jobs" and row["memory / limit"].endswith(" / 256MiB")
        if width >= 120:   # where there is room, the labels and the GPU's UUID too
            assert {r.get("labels") for r in procs} == {f"team={p}" for p in PARTITIONS}, shown
            assert "GPU-" in shown
        assert "GPU 0  fracgpu simulated GPU" in shown and "q quits" in shown
        subprocess.run(["tmux", "-S", socket, "send-keys", "-t", "top", "q"], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status.exists(), f"`q` did not end fracgpu top:\n{capture(socket)}"
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-S", socket, "kill-server"], capture_output=True, timeout=10)
