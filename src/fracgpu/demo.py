"""``fracgpu demo``: two jobs sharing one GPU under quotas and shares, in a few seconds.

Runs on the real GPU when a working driver is found, else on a simulated GPU
of its own (a private folder, so it never disturbs other users of the
simulator). Each job is a separate process using the CUDA driver API: it
allocates memory, checks a kernel's writes, and keeps the device busy with
spin kernels, each under `fracgpu run --memory ... --compute ...`; the table
shows what each one saw and used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import click

from fracgpu import kernels_path, sim
from fracgpu.units import format_size

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Job:
    name: str
    memory: str        # its quota
    compute: str       # its share of the GPU's time
    kernel_ms: float   # length of each spin kernel


JOBS = [Job("train", "3GiB", "75%", 2.0), Job("infer", "1GiB", "25%", 1.0)]
BUSY_SECONDS = 1.5


def real_gpu_available() -> bool:
    """Whether a real driver with a device is usable (probed in a subprocess, so
    this process never loads a driver)."""
    probe = ("import ctypes,sys\ntry:\n l=ctypes.CDLL('libcuda.so.1')\nexcept OSError:\n sys.exit(1)\n"
             "n=ctypes.c_int()\nsys.exit(0 if l.cuInit(0)==0 and l.cuDeviceGetCount(ctypes.byref(n))==0 "
             "and n.value>0 else 1)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACGPU_") and k != "LD_PRELOAD"}
    try:   # the simulated driver is not a GPU
        sim_dir = os.path.realpath(sim.library_dir())
        env["LD_LIBRARY_PATH"] = ":".join(p for p in env.get("LD_LIBRARY_PATH", "").split(":")
                                          if p and os.path.realpath(p) != sim_dir)
    except FileNotFoundError:
        pass
    try:
        return subprocess.run([sys.executable, "-c", probe], env=env, timeout=60,
                              capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def job_main(name: str, kernel_ms: float, module: str) -> None:
    """One demo job (``python -m fracgpu.demo NAME KERNEL_MS MODULE``), run under
    ``fracgpu run``: it fills its memory quota, sees the next allocation refused,
    checks a kernel's writes, then keeps the GPU busy; prints one JSON line."""
    import ctypes

    from fracgpu._driver import Driver

    drv = Driver()
    free, total = drv.mem_info()
    drv.load_kernels(module)
    block, blocks = 256 * MiB, []
    while True:   # up to the quota: the framework's allocator would do the same
        rc, ptr = drv.try_alloc(block)
        if rc != 0:
            break
        blocks.append(ptr)
    refused = rc == 2   # CUDA_ERROR_OUT_OF_MEMORY, handled: the job goes on with what it has
    count = 1 << 20
    drv.fill(blocks[0], 0x600DF00D, count)
    back = (ctypes.c_uint * count)()
    drv.synchronize()
    drv._check("cuMemcpyDtoH_v2", drv.lib.cuMemcpyDtoH_v2(back, ctypes.c_uint64(blocks[0]), ctypes.c_size_t(count * 4)))
    verified = all(v == 0x600DF00D for v in back[::4096])
    print("ready", flush=True)   # both jobs start their kernels together
    sys.stdin.readline()
    start, kernels = time.monotonic(), 0
    while time.monotonic() - start < BUSY_SECONDS:
        for _ in range(10):
            drv.spin(kernel_ms / 1000)
        drv.synchronize()
        kernels += 10
    wall = time.monotonic() - start
    for b in blocks:
        drv.free(b)
    print(json.dumps({"name": name, "device": drv.name(), "total": total, "free_at_start": free,
                      "allocated": len(blocks) * block, "refused": refused, "verified": verified,
                      "device_s": kernels * kernel_ms / 1000, "wall_s": wall}))


@click.command("demo")
@click.option("--gpu", type=click.Choice(["auto", "sim", "real"]), default="auto", show_default=True,
              help="Where to run: the real GPU if one works (auto), or always the simulated one.")
def demo(gpu: str) -> None:
    """Two jobs sharing one GPU: memory each saw and used, device time, wall time."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    use_real = gpu == "real" or (gpu == "auto" and real_gpu_available())
    if gpu == "real" and not real_gpu_available():
        raise click.ClickException("no working NVIDIA GPU driver was found; run `fracgpu demo --gpu sim`")
    with tempfile.TemporaryDirectory(prefix="fracgpu-demo-") as folder:
        env = dict(os.environ, FRACGPU_STATE_DIR=os.path.join(folder, "state"))
        if use_real:
            console.print("Running on the real GPU.")
        else:
            config = sim.SimConfig(memory=8 * GiB, state_dir=os.path.join(folder, "sim"))
            env.update(sim.environment(config))
            console.print(f"No GPU needed: running on a simulated {format_size(config.memory)} GPU.")
        try:
            module = str(kernels_path())
        except FileNotFoundError as e:
            if use_real:
                raise click.ClickException(str(e)) from None
            # Built without nvcc: the simulated driver runs its kernels by name from any module file.
            module = str(sim.library_dir() / "libcuda.so.1")
        procs = [subprocess.Popen([sys.executable, "-m", "fracgpu", "run", "--memory", j.memory, "--compute", j.compute,
                                   "--", sys.executable, "-m", "fracgpu.demo", j.name, str(j.kernel_ms), module],
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
                 for j in JOBS]
        for p in procs:
            p.stdout.readline()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for job, p in zip(JOBS, procs):
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise click.ClickException(f"demo job {job.name!r} failed (exit {p.returncode}):\n{err}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    table = Table(title=f"Two jobs sharing one GPU ({results[0]['device']})")
    for column in ("job", "fracgpu run", "GPU memory seen", "allocated", "next allocation", "fill verified",
                   "share of the GPU"):
        table.add_column(column, justify="left" if column in ("job", "fracgpu run") else "right")
    for job, r in zip(JOBS, results):
        table.add_row(r["name"], f"--memory {job.memory} --compute {job.compute}", format_size(r["total"]),
                      format_size(r["allocated"]), "refused (OOM)" if r["refused"] else "NOT refused",
                      "yes" if r["verified"] else "NO", f"{100 * r['device_s'] / r['wall_s']:.0f}%")
    console.print(table)
    console.print("Each job saw its quota as the GPU's memory and got CUDA_ERROR_OUT_OF_MEMORY past it; "
                  "while both were busy the GPU's time was split by their shares.")
    if not all(r["verified"] and r["refused"] for r in results):
        raise click.ClickException("a job was not held to its quota, or read back values its kernel did not write")


if __name__ == "__main__":
    job_main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
