"""Real containers for the tests: podman, a containers.conf of the tests' own, a minimal root
filesystem, and a way to run a container given CDI devices.

Podman runs containers here with runc and the cgroupfs manager once its default ulimits stay
within the machine's hard limits; that is configured in a containers.conf (and a storage.conf)
of the test session's own, through CONTAINERS_CONF and CONTAINERS_STORAGE_CONF, never in
/etc/containers. Podman 4.3 reads CDI specs only from /etc/cdi and /var/run/cdi: a test writes
its spec to /var/run/cdi under a name and a CDI kind of its own (``cdi_kind``), and removes it.

The root filesystem holds only what a user's image would: a shell and a few tools, the C
client (linked with -lcuda), a ctypes client and a Python interpreter (its standard library
mounted read-only from the host, as the image's own). Nothing of fracgpu: the CDI spec brings
the shim, the driver and the settings.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import sysconfig
import uuid

import pytest

from tests.support.simgpu import CTYPES_PRELUDE

CDI_DIR = pathlib.Path("/var/run/cdi")
TOOLS = ("/bin/sh", "/usr/bin/env", "/bin/cat", "/bin/sleep")

# The ctypes client: dlopen("libcuda.so.1") as every Python framework does, then 64 MiB blocks
# until refused (or MAX blocks), printing "blocks N" and the result, holding them HOLD seconds.
CTYPES_CLIENT = CTYPES_PRELUDE + """
import sys, time
mib, most, hold = (int(a) for a in (sys.argv[1:] + ["64", "0", "0"][len(sys.argv) - 1:])[:3])
blocks, ptr = 0, ctypes.c_uint64()
while most == 0 or blocks < most:
    rc = cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mib << 20))
    if rc != 0:
        break
    blocks += 1
print("blocks", blocks)
print("result", "CUDA_SUCCESS" if rc == 0 else "CUDA_ERROR_OUT_OF_MEMORY" if rc == 2 else rc, flush=True)
time.sleep(hold)
"""

CONTAINERS_CONF = """\
# The tests' podman: runc with the cgroupfs manager (no systemd here), and default ulimits
# within the machine's hard limits (podman's defaults ask for more than a CI box may give).
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
tmp_dir = "{tmp}"
"""

STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{root}/graph"
runroot = "{root}/run"
"""


def _hard_limit(which: int, want: int) -> int:
    hard = resource.getrlimit(which)[1]
    return want if hard == resource.RLIM_INFINITY else min(want, hard)


@dataclasses.dataclass
class Podman:
    """Podman as the tests use it: ``env`` carries CONTAINERS_CONF and CONTAINERS_STORAGE_CONF."""

    env: dict[str, str]
    stdlib: str             # the Python standard library the root filesystem's interpreter uses

    def command(self, rootfs: pathlib.Path, argv, *, devices=(), env: dict | None = None,
                name: str | None = None) -> list[str]:
        """``podman run`` of ``argv`` in ``rootfs`` with the CDI ``devices`` (fully qualified names)."""
        cmd = ["podman", "run", "--rm", "--network", "none", "-v", f"{self.stdlib}:{self.stdlib}:ro"]
        for device in devices:
            cmd += ["--device", device]
        for key, value in (env or {}).items():
            cmd += ["-e", f"{key}={value}"]
        if name:
            cmd += ["--name", name]
        # --rootfs is a flag: the folder is the first argument, where an image would be.
        return [*cmd, "--rootfs", str(rootfs), *[str(a) for a in argv]]

    def run(self, rootfs, argv, *, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(rootfs, argv, **kwargs), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, rootfs, argv, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(rootfs, argv, **kwargs), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def kill(self, name: str) -> None:
        subprocess.run(["podman", "kill", name], env=self.env, capture_output=True, timeout=60)


def _copy_with_libraries(path: str, rootfs: pathlib.Path, to: str | None = None) -> None:
    """``path`` into ``rootfs`` (at ``to``, else at the same place), with the shared libraries ldd
    says it needs, each at its own place."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    files = [(path, to or path)] + [(w, w) for line in out.splitlines() for w in line.split() if w.startswith("/")]
    for f, inside in files:
        target = rootfs / inside.lstrip("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(f), target)


def build_rootfs(folder: pathlib.Path, clients) -> pathlib.Path:
    """A minimal root filesystem: TOOLS, the C clients in /opt/clients (client_lcuda, linked with
    -lcuda, and client_dlopen), /opt/clients/ctypes_client.py, and this Python's interpreter."""
    rootfs = folder / "rootfs"
    for tool in TOOLS:
        _copy_with_libraries(tool, rootfs)
    (rootfs / "opt" / "clients").mkdir(parents=True)
    for client in clients:
        _copy_with_libraries(str(client), rootfs, f"/opt/clients/{pathlib.Path(client).name}")
    (rootfs / "opt" / "clients" / "ctypes_client.py").write_text(CTYPES_CLIENT)
    python = os.path.realpath(sys._base_executable)
    _copy_with_libraries(python, rootfs)
    (rootfs / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    if python != "/usr/bin/python3":
        os.symlink(python, rootfs / "usr" / "bin" / "python3")
    for ext in pathlib.Path(sysconfig.get_paths()["stdlib"], "lib-dynload").glob("_ctypes.*.so"):
        _copy_with_libraries(str(ext), rootfs)
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "tmp").mkdir(mode=0o1777)
    return rootfs


def _unusable(podman: Podman, rootfs: pathlib.Path) -> str | None:
    """Why podman cannot run a container here, or None."""
    for tool in ("podman", "runc"):
        if not shutil.which(tool):
            return f"{tool} is not installed (.ci/run installs podman and runc with apt-get)"
    if os.geteuid() != 0:
        return "the container tests run rootful podman (CDI specs in /var/run/cdi): run them as root"
    try:
        result = podman.run(rootfs, ["/bin/sh", "-c", "echo ready"], timeout=120)
    except subprocess.TimeoutExpired:
        return "podman run did not finish within 120 s"
    if result.returncode != 0 or result.stdout.strip() != "ready":
        return f"podman cannot run a container here (exit {result.returncode}): {result.stderr.strip()[-400:]}"
    return None


@pytest.fixture(scope="session")
def podman(tmp_path_factory, clients) -> tuple[Podman, pathlib.Path]:
    """(Podman, a root filesystem) when podman can run containers here; the tests skip, saying
    why, when it cannot."""
    folder = tmp_path_factory.mktemp("podman")
    (folder / "tmp").mkdir()
    conf, storage = folder / "containers.conf", folder / "storage.conf"
    conf.write_text(CONTAINERS_CONF.format(nofile=_hard_limit(resource.RLIMIT_NOFILE, 1024),
                                           nproc=_hard_limit(resource.RLIMIT_NPROC, 4096), tmp=folder / "tmp"))
    storage.write_text(STORAGE_CONF.format(root=folder / "storage"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FRACGPU_") and k != "LD_PRELOAD"},
           "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}
    runner = Podman(env=env, stdlib=sysconfig.get_paths()["stdlib"])
    rootfs = build_rootfs(folder, clients)
    reason = _unusable(runner, rootfs)
    if reason:
        pytest.skip(reason)
    return runner, rootfs


@pytest.fixture
def cdi_kind():
    """A CDI kind (vendor/class) of this test's own, and the spec files written under it removed
    after: /var/run/cdi is the machine's, shared by every test that runs at once."""
    token = uuid.uuid4().hex[:12]
    kind = f"test-{token}.fracgpu.dev/partition"
    yield kind
    for path in CDI_DIR.glob(f"*{token}*"):
        path.unlink(missing_ok=True)
