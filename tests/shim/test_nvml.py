"""NVML on the simulated GPU: the simulated NVML shows the simulated device,
and the NVML shim shows a job its partition with the numbers the CUDA shim
gives (cuMemGetInfo_v2), in the same process.

Each test has a simulated GPU of 1 GiB and a state folder of its own (the
`gpu` fixture); its environment puts the simulated libcuda.so.1 and
libnvidia-ml.so.1 first on LD_LIBRARY_PATH. The shims are driven by their
variables, as a job under `fracgpu run` gets them.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.support import ROOT
from tests.support.simgpu import CTYPES_PRELUDE, GiB, MiB, cuda_include_dir, shim_path

QUOTA = 256 * MiB
NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_LIBRARY_NOT_FOUND = 0, 3, 12


def nvml_shim_path() -> str:
    path = pathlib.Path(shim_path()).parent / "libfracgpu-nvml.so"
    assert path.is_file(), f"{path} is missing: install fracgpu with pip (nvml.h comes from nvidia-nvml-dev)"
    return str(path)


# One job: optionally CUDA first (context, an allocation, cuMemGetInfo_v2),
# then what NVML says about device 0, as JSON on the last line.
JOB = r"""
import ctypes, json, sys
args = json.loads(sys.argv[1])

class Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

class MemoryV2(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

out = {}
if args.get("alloc_mib") is not None:
""" + textwrap.indent(CTYPES_PRELUDE, "    ") + r"""    if args["alloc_mib"]:
        p = ctypes.c_uint64()
        assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(args["alloc_mib"] << 20)) == 0
    free, total, dtotal = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
    assert cuda.cuDeviceTotalMem_v2(ctypes.byref(dtotal), dev) == 0
    uuid = (ctypes.c_ubyte * 16)()
    assert cuda.cuDeviceGetUuid_v2(uuid, dev) == 0
    b = bytes(uuid).hex()
    out["cuda"] = {"total": total.value, "free": free.value, "device_total": dtotal.value,
                   "uuid": f"GPU-{b[:8]}-{b[8:12]}-{b[12:16]}-{b[16:20]}-{b[20:]}"}

nvml = ctypes.CDLL("libnvidia-ml.so.1")
nvml.nvmlErrorString.restype = ctypes.c_char_p
rc = nvml.nvmlInit_v2()
out["init"] = rc
out["init_text"] = nvml.nvmlErrorString(rc).decode()
if rc == 0:
    count, handle = ctypes.c_uint(), ctypes.c_void_p()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
    assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == 0
    text = ctypes.create_string_buffer(96)
    assert nvml.nvmlDeviceGetUUID(handle, text, 96) == 0
    uuid = text.value.decode()
    assert nvml.nvmlDeviceGetName(handle, text, 96) == 0
    m, m2 = Memory(), MemoryV2()
    m2.version = ctypes.sizeof(MemoryV2) | (2 << 24)
    assert nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(m)) == 0
    assert nvml.nvmlDeviceGetMemoryInfo_v2(handle, ctypes.byref(m2)) == 0
    out["nvml"] = {"count": count.value, "uuid": uuid, "name": text.value.decode(),
                   "v1": {"total": m.total, "used": m.used, "free": m.free},
                   "v2": {"version": m2.version, "total": m2.total, "used": m2.used, "free": m2.free,
                          "reserved": m2.reserved}}
    assert nvml.nvmlShutdown() == 0
print(json.dumps(out))
"""


def job(gpu, alloc_mib=None, env=None, check=True) -> dict:
    result = gpu.run(sys.executable, "-c", JOB, json.dumps({"alloc_mib": alloc_mib}), env=env, check=check)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["stderr"] = result.stderr
    return out


def shim_env(**variables) -> dict:
    return {"LD_PRELOAD": f"{shim_path()}:{nvml_shim_path()}", **variables}


@pytest.fixture
def hold(clients, gpu):
    """hold(MIB, env=...): a C client holding MIB on the simulated GPU until the test ends."""
    procs = []

    def start(mib: int, env: dict | None = None) -> subprocess.Popen:
        proc = gpu.popen(clients.lcuda, "hold", mib, 60, env=env)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == f"holding {mib}", (line, proc.stderr.read() if proc.poll() is not None else "")
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def expected_meminfo(v: dict) -> dict:
    return {"total": v["total"], "used": v["total"] - v["free"], "free": v["free"]}


# ---------------------------------------------------------------------------
# The simulated NVML alone
# ---------------------------------------------------------------------------
def test_simulated_nvml_shows_the_simulated_gpu(gpu, hold):
    idle = job(gpu)
    assert idle["init"] == NVML_SUCCESS
    nv = idle["nvml"]
    assert nv["count"] == 1 and nv["name"] == "fracgpu simulated GPU"
    assert nv["v1"] == {"total": GiB, "used": 0, "free": GiB}

    holder = hold(300)
    busy = job(gpu)["nvml"]
    held = 300 * MiB + gpu.context   # the holder's memory and its context
    assert busy["v1"] == {"total": GiB, "used": held, "free": GiB - held}
    assert busy["v2"] == {"version": busy["v2"]["version"], "total": GiB, "used": held,
                          "free": GiB - held, "reserved": 0}

    holder.kill()
    holder.wait()
    assert job(gpu)["nvml"]["v1"]["used"] == 0   # a dead process holds nothing


def test_simulated_nvml_matches_the_simulated_driver_in_one_process(gpu, hold):
    hold(100)
    out = job(gpu, alloc_mib=50)
    assert out["nvml"]["uuid"] == out["cuda"]["uuid"]
    used = 150 * MiB + 2 * gpu.context   # the holder's context and the job's own
    assert out["nvml"]["v1"] == expected_meminfo(out["cuda"]) == {"total": GiB, "used": used, "free": GiB - used}


# Lists the compute processes of device 0 as "pid used" lines (v3, v2 and v1 must agree), after checking
# that a count too small is answered with the count needed.
PROCESSES = r"""
import ctypes
n = ctypes.CDLL("libnvidia-ml.so.1")
class V1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]
class V2(ctypes.Structure):
    _fields_ = V1._fields_ + [("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]
assert n.nvmlInit_v2() == 0
h = ctypes.c_void_p()
assert n.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h)) == 0
count = ctypes.c_uint(0)
rc = n.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(count), None)
assert rc == (7 if count.value else 0), (rc, count.value)   # NVML_ERROR_INSUFFICIENT_SIZE: count is the need
lists = []
for name, kind in (("_v3", V2), ("_v2", V2), ("", V1)):
    c = ctypes.c_uint(count.value + 4)
    infos = (kind * c.value)()
    assert getattr(n, "nvmlDeviceGetComputeRunningProcesses" + name)(h, ctypes.byref(c), infos) == 0
    lists.append(sorted((i.pid, i.usedGpuMemory) for i in infos[:c.value]))
    if kind is V2:
        assert all(i.gpuInstanceId == 0xFFFFFFFF == i.computeInstanceId for i in infos[:c.value])
assert lists[0] == lists[1] == lists[2], lists
g = ctypes.c_uint(5)
assert n.nvmlDeviceGetGraphicsRunningProcesses_v3(h, ctypes.byref(g), None) == 0 and g.value == 0
for pid, used in lists[0]:
    print(pid, used)
"""


def test_simulated_nvml_lists_each_process_with_what_it_holds(gpu, hold):
    """nvmlDeviceGetComputeRunningProcesses: each process's usedGpuMemory from the device's own accounting
    (its context included), the way fracgpu measures a context and reconciles its books."""
    assert gpu.python(PROCESSES).stdout.split() == []
    a, b = hold(100), hold(300)
    listed = dict(map(int, line.split()) for line in gpu.python(PROCESSES).stdout.splitlines())
    assert listed == {a.pid: 100 * MiB + gpu.context, b.pid: 300 * MiB + gpu.context}
    a.kill()
    a.wait()
    listed = dict(map(int, line.split()) for line in gpu.python(PROCESSES).stdout.splitlines())
    assert listed == {b.pid: 300 * MiB + gpu.context}   # a dead process is gone from the list


def test_simulated_nvml_indexes_every_device_whatever_cuda_sees(make_gpu):
    gpu = make_gpu(memory=GiB, devices=3)
    out = job(gpu, alloc_mib=0, env={"CUDA_VISIBLE_DEVICES": "2"})
    assert out["nvml"]["count"] == 3
    # CUDA's device 0 is the third device; NVML's device 0 is the first.
    code = ("import ctypes\nn = ctypes.CDLL('libnvidia-ml.so.1')\nassert n.nvmlInit_v2() == 0\n"
            "h = ctypes.c_void_p(); b = ctypes.create_string_buffer(96); i = ctypes.c_uint()\n"
            "assert n.nvmlDeviceGetHandleByIndex_v2(2, ctypes.byref(h)) == 0\n"
            "assert n.nvmlDeviceGetUUID(h, b, 96) == 0 and n.nvmlDeviceGetIndex(h, ctypes.byref(i)) == 0\n"
            "g = ctypes.c_void_p(); assert n.nvmlDeviceGetHandleByUUID(b.value, ctypes.byref(g)) == 0\n"
            "assert g.value == h.value\n"
            "assert n.nvmlDeviceGetHandleByIndex_v2(3, ctypes.byref(h)) == 2\n"
            "print(b.value.decode(), i.value)")
    third, index = gpu.python(code).stdout.split()
    assert third == out["cuda"]["uuid"] and index == "2"


def test_simulated_nvml_answers_the_rest_not_supported(gpu):
    code = ("import ctypes\nn = ctypes.CDLL('libnvidia-ml.so.1')\nn.nvmlErrorString.restype = ctypes.c_char_p\n"
            "u = ctypes.c_uint(); h = ctypes.c_void_p()\n"
            "print(n.nvmlDeviceGetCount_v2(ctypes.byref(u)))\n"           # before init: uninitialized
            "assert n.nvmlInit_v2() == 0 and n.nvmlInit() == 0\n"
            "assert n.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h)) == 0\n"
            "print(n.nvmlDeviceGetPowerUsage(h, ctypes.byref(u)), n.nvmlErrorString(3).decode().replace(' ', '_'))\n"
            "v = ctypes.create_string_buffer(80); i = ctypes.c_int()\n"
            "assert n.nvmlSystemGetDriverVersion(v, 80) == 0 and v.value\n"
            "assert n.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(i)) == 0 and i.value >= 13000\n"
            "print(n.nvmlShutdown(), n.nvmlShutdown(), n.nvmlShutdown())")
    lines = gpu.python(code).stdout.split("\n")
    assert lines[0] == "1"                                   # NVML_ERROR_UNINITIALIZED
    assert lines[1] == f"{NVML_ERROR_NOT_SUPPORTED} Not_Supported"
    assert lines[2] == "0 0 1"                               # two inits, two shutdowns, then uninitialized


def generated_names(tmp_path) -> list[str]:
    out = tmp_path / "nvml_exports.txt"
    subprocess.run([sys.executable, str(ROOT / "csrc" / "gen" / "gen_nvml_api.py"), "--include", str(cuda_include_dir()),
                    "--mode", "names", "--out", str(out)], check=True)
    return out.read_text().split()


def exported(path: str) -> set[str]:
    result = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in result.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils) to list exported symbols")
def test_both_nvml_libraries_export_every_nvml_function_and_nothing_else(tmp_path):
    from fracgpu import sim

    names = generated_names(tmp_path)
    assert len(names) > 300 and "nvmlInit" in names and "nvmlInit_v2" in names
    for path in (nvml_shim_path(), str(sim.library_dir() / "libnvidia-ml.so.1")):
        assert exported(path) == set(names), path
    assert "fracgpu_sim_device_info" in exported(str(sim.library_dir() / "libcuda.so.1"))


# ---------------------------------------------------------------------------
# The NVML shim
# ---------------------------------------------------------------------------
def test_nvml_shows_the_partition_as_cuda_does(gpu):
    out = job(gpu, alloc_mib=100, env=shim_env(FRACGPU_PARTITION="p", FRACGPU_MEMORY="256MiB"))
    cuda = out["cuda"]
    assert cuda["total"] == cuda["device_total"] == QUOTA
    assert cuda["total"] - cuda["free"] == 100 * MiB + gpu.context   # its context is inside the quota
    assert out["nvml"]["v1"] == expected_meminfo(cuda)
    v2 = out["nvml"]["v2"]
    assert {k: v2[k] for k in ("total", "used", "free")} == expected_meminfo(cuda)
    assert v2["reserved"] == 0 and v2["version"] == 40 | (2 << 24)   # the caller's version stays
    # The device's key in the shared state is the text NVML gives.
    assert (gpu.state_dir / f"gpu-{out['nvml']['uuid']}.state").is_file()
    assert out["nvml"]["uuid"] == cuda["uuid"]


def test_nvml_counts_every_member_of_the_partition(gpu, hold):
    env = shim_env(FRACGPU_PARTITION="p", FRACGPU_MEMORY="256MiB")
    hold(64, env=env)           # another member of partition p
    hold(500)                   # a process outside fracgpu: not the partition's
    out = job(gpu, alloc_mib=32, env=env)
    used = 96 * MiB + 2 * gpu.context   # both members' contexts are the partition's
    assert out["nvml"]["v1"] == expected_meminfo(out["cuda"]) == {"total": QUOTA, "used": used, "free": QUOTA - used}


def test_free_is_never_more_than_the_device_has(gpu, hold):
    hold(900)                   # outside the partition: the device has 124 MiB free
    out = job(gpu, alloc_mib=16, env=shim_env(FRACGPU_PARTITION="p", FRACGPU_MEMORY="256MiB"))
    assert out["nvml"]["v1"]["free"] == out["cuda"]["free"] == GiB - 916 * MiB - 2 * gpu.context
    assert out["nvml"]["v1"]["total"] == out["cuda"]["total"] == QUOTA
    assert out["nvml"]["v1"]["used"] == 16 * MiB + gpu.context


def test_a_killed_member_stops_counting(gpu, hold):
    env = shim_env(FRACGPU_PARTITION="p", FRACGPU_MEMORY="256MiB")
    member = hold(64, env=env)
    keeper = hold(8, env=env)   # keeps the private partition alive after the kill
    assert job(gpu, env=env)["nvml"]["v1"]["used"] == 72 * MiB + 2 * gpu.context   # and both contexts
    member.kill()
    member.wait()
    used = 8 * MiB + gpu.context
    assert job(gpu, env=env)["nvml"]["v1"] == {"total": QUOTA, "used": used, "free": QUOTA - used}
    assert keeper.poll() is None


def test_before_cuda_starts_nvml_shows_the_quota_to_come(gpu):
    out = job(gpu, env=shim_env(FRACGPU_PARTITION="p", FRACGPU_MEMORY="25%"))
    assert out["nvml"]["v1"] == {"total": GiB // 4, "used": 0, "free": GiB // 4}


def test_without_a_partition_nvml_passes_through(gpu, hold):
    hold(200)
    plain = job(gpu, alloc_mib=10)["nvml"]["v1"]
    used = 210 * MiB + 2 * gpu.context   # the holder's context and the job's own
    assert plain == {"total": GiB, "used": used, "free": GiB - used}
    shimmed = job(gpu, alloc_mib=10, env=shim_env())
    assert shimmed["nvml"]["v1"] == plain
    assert shimmed["nvml"]["v1"] == expected_meminfo(shimmed["cuda"])


def test_a_partition_not_on_this_gpu_passes_through(gpu, hold):
    hold(200)
    # No CUDA in this job (the CUDA shim would refuse an unknown partition): NVML only reports.
    out = job(gpu, env=shim_env(FRACGPU_PARTITION="elsewhere"))
    used = 200 * MiB + gpu.context   # the holder's memory and context
    assert out["nvml"]["v1"] == {"total": GiB, "used": used, "free": GiB - used}
    assert out["stderr"] == ""


def test_a_damaged_state_file_shows_the_device_and_says_why(gpu):
    env = shim_env(FRACGPU_PARTITION="p", FRACGPU_MEMORY="256MiB")
    out = job(gpu, alloc_mib=0, env=env)
    state = gpu.state_dir / f"gpu-{out['nvml']['uuid']}.state"
    state.write_bytes(b"not a fracgpu state file, but long enough to look at")
    damaged = job(gpu, env=env)
    assert damaged["nvml"]["v1"] == {"total": GiB, "used": 0, "free": GiB}
    assert damaged["stderr"].count("fracgpu: NVML shows the whole device") == 1
    assert "not a fracgpu state file" in damaged["stderr"]


def test_without_the_real_nvml_the_shim_says_so(gpu, tmp_path):
    out = job(gpu, env={"LD_PRELOAD": nvml_shim_path(), "FRACGPU_REAL_LIBNVML": str(tmp_path / "missing.so")})
    assert out["init"] == NVML_ERROR_LIBRARY_NOT_FOUND
    assert out["init_text"] == "Library Not Found"
    assert "FRACGPU_REAL_LIBNVML=" in out["stderr"] and "cannot be read" in out["stderr"]
    itself = job(gpu, env={"LD_PRELOAD": nvml_shim_path(), "FRACGPU_REAL_LIBNVML": nvml_shim_path()})
    assert itself["init"] == NVML_ERROR_LIBRARY_NOT_FOUND
    assert "is fracgpu's own shim, not the real NVML" in itself["stderr"]
