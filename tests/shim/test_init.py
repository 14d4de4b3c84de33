"""`fracgpu.init()`: the calling process (and its children) under a quota, or a clear refusal.

Each case runs in a fresh Python process on the test's own simulated GPU and
state folder: init() changes its process for good (environment, loaded
shim), so it is never called in the test runner itself."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from tests.support.simgpu import MiB

# A job that reports what init() returned or raised, its fracgpu environment,
# and whether the shim is loaded in it.
REPORT = """
import json, os
def report(**extra):
    maps = open("/proc/self/maps").read()
    env = {k: v for k, v in os.environ.items() if k in ("LD_PRELOAD", "FRACGPU_REAL_LIBCUDA")
           or (k.startswith("FRACGPU_") and not k.startswith("FRACGPU_SIM_"))}
    print(json.dumps({"env": env, "shim_loaded": "libfracgpu.so" in maps, "pid": os.getpid(), **extra}))
def attempt(call):
    try:
        return {"result": call()}
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}
"""


def job(gpu, body: str, env=None, check=True) -> dict:
    result = gpu.python(REPORT + textwrap.dedent(body), env=env, check=check)
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    return json.loads(lines[-1])


def test_memory_sets_the_variables_and_loads_the_shim(gpu, shim):
    out = job(gpu, """
        import fracgpu
        name = fracgpu.init(memory="256MiB")
        report(result=name)
    """)
    assert out["result"] == f"init-{out['pid']}"
    assert out["shim_loaded"]
    env = out["env"]
    assert env["FRACGPU_PARTITION"] == f"init-{out['pid']}"
    assert env["FRACGPU_MEMORY"] == "256MiB"
    assert env["FRACGPU_STATE_DIR"] == str(gpu.state_dir)
    assert env["LD_PRELOAD"].split(":")[0] == shim   # so the processes it starts are in the partition too
    assert env["FRACGPU_REAL_LIBCUDA"].endswith("/_sim/libcuda.so.1")


def test_cuda_then_sees_the_quota_and_usage_shows_the_partition(gpu):
    out = job(gpu, """
        import ctypes, fracgpu
        fracgpu.init(memory=256 << 20, oom_wait=0)
        cuda = ctypes.CDLL("libcuda.so.1")          # the shim, by its SONAME
        assert cuda.cuInit(0) == 0
        dev, ctx, p = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
        cuda.cuDeviceGet(ctypes.byref(dev), 0)
        cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
        cuda.cuCtxSetCurrent(ctx)
        total = ctypes.c_size_t()
        cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
        assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(64 << 20)) == 0
        (gpu,) = fracgpu.usage()
        report(total=total.value, partitions=[[p.name, p.memory_limit, p.used, p.ephemeral] for p in gpu.partitions],
               processes=[[p.pid, p.partition, p.used] for p in gpu.processes])
    """)
    assert out["env"]["FRACGPU_MEMORY"] == str(256 * MiB)
    assert out["env"]["FRACGPU_OOM_WAIT"] == "0.0"
    assert out["total"] == 256 * MiB
    name = f"init-{out['pid']}"
    assert out["partitions"] == [[name, 256 * MiB, 64 * MiB + gpu.context, True]]   # and its context
    assert out["processes"] == [[out["pid"], name, 64 * MiB + gpu.context]]


def test_children_inherit_the_partition(clients, gpu):
    out = job(gpu, f"""
        import fracgpu, subprocess, sys
        fracgpu.init(memory="256MiB")
        child = subprocess.run([{str(clients.lcuda)!r}, "info"], capture_output=True, text=True)
        again = subprocess.run([sys.executable, "-c", "import fracgpu; print(fracgpu.init(memory=268435456))"],
                               capture_output=True, text=True)
        report(child=child.stdout, again=again.stdout.strip(), again_err=again.stderr)
    """)
    facts = dict(line.split(" ", 1) for line in out["child"].splitlines())
    assert facts["total_mem"] == str(256 * MiB)
    # A child calling init() with the same settings joins its parent's partition (as after a fork).
    assert out["again"] == f"init-{out['pid']}", out["again_err"]


def test_partition_joins_an_existing_one(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "128MiB")
    out = job(gpu, """
        import fracgpu
        report(**attempt(lambda: fracgpu.init(partition="team")))
    """)
    assert out["result"] == "team"
    assert out["env"]["FRACGPU_PARTITION"] == "team"
    assert "FRACGPU_MEMORY" not in out["env"]


def test_a_second_call_with_the_same_settings_does_nothing_and_others_are_refused(gpu):
    out = job(gpu, """
        import fracgpu
        first = fracgpu.init(memory="256MiB")
        same = [fracgpu.init(memory="256MiB"), fracgpu.init(memory=256 << 20), fracgpu.init(memory="0.25GiB")]
        other = attempt(lambda: fracgpu.init(memory="512MiB"))
        joined = attempt(lambda: fracgpu.init(partition="team"))
        report(first=first, same=same, other=other, joined=joined)
    """)
    assert out["same"] == [out["first"]] * 3
    for refused in (out["other"], out["joined"]):
        assert refused["error"] == "InitError"
        assert "already put this process under memory='256MiB'" in refused["message"]


def test_refused_once_cuda_has_started(gpu):
    out = job(gpu, """
        import ctypes, fracgpu
        ctypes.CDLL("libcuda.so.1")     # the simulated driver: a real driver, as far as fracgpu can tell
        report(**attempt(lambda: fracgpu.init(memory="256MiB")))
    """)
    assert out["error"] == "InitError"
    assert "CUDA has already started in this process" in out["message"]
    assert "/_sim/libcuda.so.1" in out["message"]
    assert "before importing or initialising CUDA" in out["message"] and "fracgpu run" in out["message"]
    assert not out["shim_loaded"] and "FRACGPU_PARTITION" not in out["env"]   # nothing half done


def test_refused_when_the_driver_was_opened_by_its_path(gpu):
    out = job(gpu, """
        import ctypes, fracgpu, fracgpu.sim
        lib = ctypes.CDLL(str(fracgpu.sim.library_dir() / "libcuda.so.1"))
        assert lib.cuInit(0) == 0
        report(**attempt(lambda: fracgpu.init(partition="team")))
    """)
    assert out["error"] == "InitError" and "CUDA has already started" in out["message"]


@pytest.mark.parametrize("call, error, phrase", [
    ("fracgpu.init()", "TypeError", "takes memory=, compute= and/or priority= "),
    ("fracgpu.init(memory='1GiB', partition='team')", "TypeError", "not both"),
    ("fracgpu.init(memory='lots')", "ValueError", "invalid size 'lots'"),
    ("fracgpu.init(memory=0)", "ValueError", "at least 1 byte"),
    ("fracgpu.init(memory=1.5)", "TypeError", "a size must be a str or an int"),
    ("fracgpu.init(memory='2GiB')", "ValueError", "memory limit 2GiB is above the 1GiB of GPU 0"),
    ("fracgpu.init(partition='bad name')", "ValueError", "invalid partition name 'bad name'"),
    ("fracgpu.init(partition='nosuch')", "ValueError", "partition 'nosuch' does not exist"),
    ("fracgpu.init(memory='1GiB', oom_wait=-1)", "ValueError", "give seconds"),
    ("fracgpu.init(memory='1GiB', oom_wait='soon')", "ValueError", "give seconds"),
    ("fracgpu.init(priority='urgent')", "ValueError",
     "invalid priority 'urgent': it is not a priority class; write high, normal or low"),
    ("fracgpu.init(memory='1GiB', priority=2)", "TypeError", "write high, normal or low"),
    ("fracgpu.init(partition='team', priority='high')", "TypeError", "fracgpu partition set team --priority high"),
])
def test_bad_arguments(gpu, call, error, phrase):
    out = job(gpu, f"""
        import fracgpu
        report(**attempt(lambda: {call}))
    """)
    assert out["error"] == error and phrase in out["message"], out
    assert not out["shim_loaded"] and "FRACGPU_PARTITION" not in out["env"]


def test_a_mistake_can_be_corrected(gpu):
    out = job(gpu, """
        import fracgpu
        first = attempt(lambda: fracgpu.init(memory="2GiB"))
        report(first=first, **attempt(lambda: fracgpu.init(memory="1GiB")))
    """)
    assert out["first"]["error"] == "ValueError"
    assert out["result"] == f"init-{out['pid']}"


def test_an_unsafe_or_damaged_state_is_refused(gpu):
    gpu.fracgpu("partition", "create", "team")
    gpu.state_dir.chmod(0o777)
    try:
        out = job(gpu, "import fracgpu\nreport(**attempt(lambda: fracgpu.init(memory='25%')))")
    finally:
        gpu.state_dir.chmod(0o700)
    assert out["error"] == "InitError" and "unsafe permissions" in out["message"]
    (path,) = gpu.state_dir.glob("gpu-*.state")
    path.write_bytes(b"\0" * 4096)
    out = job(gpu, "import fracgpu\nreport(**attempt(lambda: fracgpu.init(partition='team')))")
    assert out["error"] == "InitError" and "not a fracgpu state file" in out["message"]


def test_an_explicit_state_dir(gpu, tmp_path):
    folder = tmp_path / "elsewhere"
    out = job(gpu, f"import fracgpu\nreport(**attempt(lambda: fracgpu.init(memory='1GiB', state_dir={str(folder)!r})))")
    assert out["env"]["FRACGPU_STATE_DIR"] == str(folder)
    assert folder.stat().st_mode & 0o777 == 0o700


def test_no_gpu_to_check_a_size_against(gpu):
    out = job(gpu, "import fracgpu\nreport(**attempt(lambda: fracgpu.init(memory='1GiB')))",
              env={"CUDA_VISIBLE_DEVICES": ""})
    assert out["error"] == "InitError" and 'eval "$(fracgpu sim env)"' in out["message"]


def test_under_fracgpu_run_the_same_settings_are_a_no_op_and_others_refused(gpu):
    code = REPORT + "import fracgpu, sys\nreport(**attempt(lambda: fracgpu.init(memory=sys.argv[1])))"
    p = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", sys.executable, "-c", code,
                  "256MiB")
    out = json.loads(p.communicate(timeout=60)[0])
    assert out["result"] == f"run-{p.pid}"
    assert out["env"]["FRACGPU_PARTITION"] == f"run-{p.pid}"
    result = gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-c", code, "1GiB")
    out = json.loads(result.stdout)
    assert out["error"] == "InitError"
    assert "was started in fracgpu partition 'run-" in out["message"] and "memory='1GiB'" in out["message"]


def test_importing_fracgpu_loads_no_driver_and_no_shim(gpu):
    out = job(gpu, """
        import sys, fracgpu
        fracgpu.usage()
        report(modules=sorted(m for m in ("ctypes", "fracgpu.in_process", "fracgpu.devices") if m in sys.modules),
               has_init=callable(fracgpu.init) and issubclass(fracgpu.InitError, RuntimeError))
    """)
    assert out["modules"] == [] and out["has_init"] and not out["shim_loaded"]
