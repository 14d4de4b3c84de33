"""The README's first command ends in `fracgpu demo`: it must work on a machine without a GPU."""

import os
import shutil
import subprocess
import sys

from fracgpu import sim
from tests.support import ROOT, screen
from fracgpu.units import format_size


def rows(section: str) -> dict[str, list[str]]:
    return {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in section.splitlines() if line.startswith("│")}


def test_demo_runs_three_jobs_then_shows_the_live_view_and_the_report_on_the_simulated_gpu(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fracgpu", "demo", "--gpu", "sim"], capture_output=True,
                            text=True, timeout=300, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "simulated 8GiB GPU" in out
    live, rest = out.split("Three jobs sharing one GPU")
    summary, _, report = rest.partition("fracgpu report")
    # The live view: three partitions, each with its limit and share, and its job's name.
    (partitions,) = screen.tables(live, "partition")
    assert len(partitions) == 3 and all(p["partition"].startswith("run-") for p in partitions)
    assert sorted(p["memory / limit"].split(" / ")[1] for p in partitions) == ["1GiB", "1GiB", "3GiB"], partitions
    assert sorted(p["share"] for p in partitions) == ["25%", "25%", "50%"], partitions
    assert sorted(p["job"] for p in partitions) == ["batch", "infer", "train"]
    (processes,) = screen.tables(live, "pid")
    assert sorted(p["job"] for p in processes) == ["batch", "infer", "train"]
    # Each job saw its quota as the GPU; 'batch' asked for more, was refused and went on with less.
    (results,) = screen.tables(summary, "job")
    jobs = {r["job"]: r for r in results}
    assert [jobs["train"][c] for c in ("fracgpu run", "GPU memory seen", "asked", "got")] == \
        ["--memory 3GiB --compute 50%", "3GiB", "2GiB", "2GiB"]
    assert [jobs["infer"][c] for c in ("fracgpu run", "GPU memory seen", "asked", "got")] == \
        ["--memory 1GiB --compute 25% --priority high", "1GiB", "512MiB", "512MiB"]
    assert [jobs["batch"][c] for c in ("fracgpu run", "GPU memory seen", "asked", "got")] == \
        ["--memory 1GiB --compute 25%", "1GiB", "1.5GiB (refused, 1x halved)", "768MiB"]
    assert all(r["verified"] == "yes" for r in results)
    # 'infer' served requests at high priority: it used what they need (a 1 ms kernel every 20 ms), and
    # shows their latency; the rest of the GPU's time went to the others by their shares.
    shares = {name: int(r["GPU share"].rstrip("%")) for name, r in jobs.items()}
    assert shares["infer"] <= 10 and 1.5 <= shares["train"] / shares["batch"] <= 2.6, shares
    latency = {name: r["request p50 / p99"] for name, r in jobs.items()}
    assert latency["infer"].endswith(" ms") and latency["train"] == latency["batch"] == "-", jobs
    assert "(private, high)" in live
    # Its closing hint works as printed on this machine without a GPU: it selects the simulated GPU.
    hint = out.split("Your own jobs:", 1)[1]
    commands = [line.strip() for line in hint.splitlines() if line.startswith("  ")]
    assert commands == ['eval "$(fracgpu sim env)"', "fracgpu run --memory 4GiB --compute 25% -- python train.py"]
    shutil.copy(ROOT / "examples" / "train.py", tmp_path / "train.py")
    shutil.copy(ROOT / "examples" / "_gpu.py", tmp_path / "_gpu.py")
    ran = subprocess.run(["bash", "-e", "-c", "\n".join(commands)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
                                           "XDG_RUNTIME_DIR": str(tmp_path), "FRACGPU_LEDGER": str(tmp_path / "l")})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "train: fracgpu simulated GPU, 4GiB of memory as this job sees it" in ran.stdout
    # The report: the three jobs from the ledger, ended with status 0, each with device time.
    recorded = rows(report)
    assert set(recorded) == {"train", "infer", "batch"}
    for name, cells in recorded.items():   # 'infer' used a 1 ms kernel every 20 ms for 2 s: 0.1 s
        assert cells[3] == "0" and float(cells[4].rstrip(" s")) > (0.05 if name == "infer" else 0.2), (name, cells)
    assert recorded["infer"][0].endswith(" (high)"), recorded
    # Peaks: what each job allocated, and its context (inside its quota) on the simulated 8 GiB GPU.
    context = sim.SimConfig(memory=8 << 30).reserved_per_context()
    assert recorded["batch"][6] == format_size((768 << 20) + context)
    assert recorded["train"][6] == format_size((2 << 30) + context)


def test_demo_real_without_a_gpu_says_what_to_do():
    result = subprocess.run([sys.executable, "-m", "fracgpu", "demo", "--gpu", "real"], capture_output=True,
                            text=True, timeout=120)
    if result.returncode == 0:
        return  # a machine with a real GPU
    assert result.returncode == 1
    assert "fracgpu demo --gpu sim" in result.stderr


def test_demo_on_a_gpu_without_the_kernels_runs_on_the_simulated_gpu_and_says_why(monkeypatch):
    """A working GPU, but fracgpu built without nvcc (no kernels): the demo still runs, on the
    simulated GPU, with a note that says why and how to get the kernels."""
    from click.testing import CliRunner

    import fracgpu
    from fracgpu.exercise import demo
    from fracgpu.cli import main

    def no_kernels():
        raise FileNotFoundError("fracgpu's CUDA kernels are not installed (kernels/fracgpu_kernels.fatbin is "
                                "missing): this package was built without nvcc. `pip install nvidia-cuda-nvcc`, "
                                "then rebuild fracgpu")

    monkeypatch.setattr(demo, "real_gpu_available", lambda: True)
    monkeypatch.setattr(demo, "kernels_path", no_kernels)
    monkeypatch.setattr(fracgpu, "kernels_path", no_kernels)
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "note: not running on the real GPU: fracgpu's CUDA kernels are not installed" in result.stderr
    assert "pip install nvidia-cuda-nvcc" in result.stderr
    assert "simulated 8GiB GPU" in result.stdout and "Running on the real GPU" not in result.stdout
    assert set(rows(result.stdout.partition("fracgpu report")[2])) == {"train", "infer", "batch"}

    result = CliRunner().invoke(main, ["demo", "--gpu", "real"])   # asked for the real GPU: refused, with why
    assert result.exit_code == 1 and "pip install nvidia-cuda-nvcc" in result.stderr
