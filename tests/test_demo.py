"""The README's first command ends in `fracgpu demo`: it must work on a machine without a GPU."""

import subprocess
import sys


def test_demo_runs_two_jobs_on_the_simulated_gpu():
    result = subprocess.run([sys.executable, "-m", "fracgpu", "demo", "--gpu", "sim"], capture_output=True,
                            text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "simulated 8GiB GPU" in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}
    assert rows["train"][:3] == ["8GiB", "3GiB", "yes"]
    assert rows["infer"][:3] == ["8GiB", "1GiB", "yes"]
    # The jobs take turns on one device: each waits for the other's kernels.
    assert float(rows["infer"][4].split()[0]) >= 1.1


def test_demo_real_without_a_gpu_says_what_to_do():
    result = subprocess.run([sys.executable, "-m", "fracgpu", "demo", "--gpu", "real"], capture_output=True,
                            text=True, timeout=120)
    if result.returncode == 0:
        return  # a machine with a real GPU
    assert result.returncode == 1
    assert "fracgpu demo --gpu sim" in result.stderr
