"""The README's first command ends in `fracgpu demo`: it must work on a machine without a GPU."""

import subprocess
import sys


def test_demo_runs_two_jobs_under_quotas_and_shares_on_the_simulated_gpu():
    result = subprocess.run([sys.executable, "-m", "fracgpu", "demo", "--gpu", "sim"], capture_output=True,
                            text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "simulated 8GiB GPU" in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}
    # Each job saw its quota as the GPU, filled it, and had the next allocation refused.
    assert rows["train"][:5] == ["--memory 3GiB --compute 75%", "3GiB", "3GiB", "refused (OOM)", "yes"]
    assert rows["infer"][:5] == ["--memory 1GiB --compute 25%", "1GiB", "1GiB", "refused (OOM)", "yes"]
    # While both were busy, the GPU's time went by their shares.
    assert 20 <= int(rows["infer"][5].rstrip("%")) <= 30
    assert 65 <= int(rows["train"][5].rstrip("%")) <= 80


def test_demo_real_without_a_gpu_says_what_to_do():
    result = subprocess.run([sys.executable, "-m", "fracgpu", "demo", "--gpu", "real"], capture_output=True,
                            text=True, timeout=120)
    if result.returncode == 0:
        return  # a machine with a real GPU
    assert result.returncode == 1
    assert "fracgpu demo --gpu sim" in result.stderr
