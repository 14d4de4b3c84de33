"""CDI devices for partitions: each partition is one device a container runtime can inject.

The Container Device Interface (CDI) is how podman (4.1+), containerd (1.7+ with
``enable_cdi``), CRI-O, Docker (25+) and the kubelet inject devices. A spec file
under ``/etc/cdi`` or ``/var/run/cdi`` names devices of a kind; fracgpu's kind is
``fracgpu.dev/partition``, and each partition of the node is one device of it::

    podman run --device fracgpu.dev/partition=team-a ...

A container given a partition gets (``containerEdits``):

- the GPU's device nodes (``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/nvidia0``, ...
  as the host has them; none on the simulated GPU);
- the driver shim and the NVML shim, read-only in ``/usr/lib/fracgpu``, and an
  ``/etc/ld.so.preload`` naming them: the dynamic loader loads them into every
  process, whatever its environment says (``LD_PRELOAD`` unset or not);
- the real driver and NVML, read-only in ``/usr/lib/fracgpu/driver``: off the
  loader's search path, so a process the shim could not be loaded into finds no
  driver rather than an unlimited one;
- the node's state folder (read-write, at ``/run/fracgpu/state``): every container
  and host process on the GPU shares one partition table, one quota per partition
  and one launch gate;
- the partition's node configuration file at ``/etc/fracgpu/fracgpu.conf``
  (read-only), which binds every process to its partition (``fracgpu.config``):
  the binding is what the spec mounts, not a variable a process can change;
- on the simulated GPU, the simulated driver and NVML in place of the real ones,
  its shared folder (``/run/fracgpu/sim``) and its ``FRACGPU_SIM_*`` variables.

The image needs nothing of fracgpu: no Python, no package, only a glibc the shim
can be loaded by (``GLIBC_FLOOR``).

``spec()`` makes the spec, ``write_spec()`` writes it atomically (a temporary file
renamed into place), so ``fracgpu cdi generate``, the node agent and a Kubernetes
plugin can refresh it whenever partitions change while runtimes read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping

from fracgpu import config, files, settings, shim, state

__all__ = ["KIND", "SPEC_DIR", "CONFIG_DIR", "GLIBC_FLOOR", "Layout", "Refused", "check_kind", "device_name", "spec",
           "minimum_version", "write_spec", "write_spec_file", "remove_spec", "default_spec_path", "partition_names",
           "qualified_names"]

KIND = "fracgpu.dev/partition"
SPEC_DIR = "/var/run/cdi"
# The host folder of the files the spec mounts that are made for it (each partition's node
# configuration, the ld.so.preload): outside the state folder, which containers can write.
CONFIG_DIR = "/var/run/fracgpu/cdi"
# The newest glibc symbol version the shims need (objdump -T of libfracgpu.so and libfracgpu-nvml.so).
GLIBC_FLOOR = "2.34"
EARLIEST_VERSION = "0.3.0"

# Where things are inside the container.
LIBRARY_DIR = "/usr/lib/fracgpu"
DRIVER_DIR = "/usr/lib/fracgpu/driver"
STATE_DIR = "/run/fracgpu/state"
SIM_DIR = "/run/fracgpu/sim"
PRELOAD = "/etc/ld.so.preload"

GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
_GPU_NODE = re.compile(r"nvidia\d+")
# CDI device names: letters, digits and _ - . : , starting and ending with a letter or digit.
_DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")


class Refused(ValueError):
    """A partition that cannot be a CDI device (its name), or a spec that cannot be made."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the spec mounts from the host: the shims, the driver and NVML the shim forwards to,
    the state folder and its group, the simulated GPU's folder and settings (on the simulated
    GPU), and the folder for the files made for the spec."""

    shim: str
    nvml_shim: str | None
    driver: str
    nvml: str | None
    state_dir: str
    config_dir: str = CONFIG_DIR
    state_group: str | None = None
    sim: Mapping[str, str] | None = None          # FRACGPU_SIM_* of the simulated GPU; None: a real GPU
    device_nodes: tuple[str, ...] = ()

    @classmethod
    def for_node(cls, env: Mapping[str, str] | None = None, config_dir: str = CONFIG_DIR) -> Layout:
        """This node's layout: the installed shims, the driver the shim would forward to (the
        simulated one when ``env`` selects it), the node's state folder and group, and the GPU's
        device nodes. Refused when no driver is found."""
        env = os.environ if env is None else env
        library = os.fspath(shim.shim_path())
        driver = env.get(settings.REAL_LIBCUDA) or shim.find_real_driver(env, library)
        if not driver:
            raise Refused("no CUDA driver found for the containers (libcuda.so.1); install the NVIDIA driver, or set "
                          "FRACGPU_REAL_LIBCUDA to its full path")
        nvml = env.get(settings.REAL_LIBNVML) or _beside(driver, "libnvidia-ml.so.1")
        node = config.read()
        simulated = {k: v for k, v in env.items() if k.startswith("FRACGPU_SIM_") and v} \
            if _is_simulated(driver) else None
        if simulated is not None and settings.SIM_DIR not in simulated:
            raise Refused("the simulated GPU's folder is not named: set FRACGPU_SIM_DIR, so that the containers "
                          "share the simulated GPU of the host")
        nodes = tuple(p for p in GPU_DEVICE_NODES if os.path.exists(p)) + tuple(
            sorted(f"/dev/{n}" for n in _listdir("/dev") if _GPU_NODE.fullmatch(n)))
        return cls(shim=library, nvml_shim=shim.nvml_shim_path(library), driver=os.path.realpath(driver),
                   nvml=os.path.realpath(nvml) if nvml else None, state_dir=state.resolve_state_dir(),
                   config_dir=config_dir, state_group=node.get(settings.STATE_GROUP) or env.get(settings.STATE_GROUP)
                   or None, sim=simulated, device_nodes=() if simulated is not None else nodes)


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _beside(path: str, name: str) -> str | None:
    other = os.path.join(os.path.dirname(os.path.realpath(path)), name)
    return other if os.path.isfile(other) else None


def _is_simulated(driver: str) -> bool:
    from fracgpu import sim
    try:
        return os.path.samefile(os.path.dirname(os.path.realpath(driver)), sim.library_dir())
    except (FileNotFoundError, OSError):
        return False


def check_kind(kind: str) -> str:
    """``kind`` when it is a CDI kind (``vendor/class``: ``fracgpu.dev/partition``); Refused naming
    the rule otherwise."""
    vendor, slash, klass = kind.partition("/")
    if not slash or not _DEVICE_NAME.fullmatch(vendor) or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?",
                                                                          klass) or ":" in vendor:
        raise Refused(f"'{kind}' is not a CDI kind: write vendor/class, like {KIND} (letters, digits, '-', '_' "
                      "and '.', each part starting and ending with a letter or digit)")
    return kind


def device_name(partition: str) -> str:
    """The CDI device of ``partition`` (its name); Refused for a name CDI does not accept."""
    if not _DEVICE_NAME.fullmatch(partition):
        raise Refused(f"partition '{partition}' cannot be a CDI device: CDI names start and end with a letter or "
                      "digit")
    return partition


def partition_names(state_dir: str | None = None) -> list[str]:
    """The partitions of the node (on any GPU), sorted, without the private ones of single jobs."""
    return sorted({p.name for gpu in state.usage(state_dir) for p in gpu.partitions if not p.ephemeral})


def qualified_names(partitions: Iterable[str], kind: str = KIND) -> list[str]:
    """``fracgpu.dev/partition=NAME`` for each partition CDI can name."""
    check_kind(kind)
    out = []
    for name in partitions:
        try:
            out.append(f"{kind}={device_name(name)}")
        except Refused:
            continue
    return out


def _mount(host: str, container: str, *, writable: bool = False) -> dict:
    return {"hostPath": host, "containerPath": container,
            "options": ["rw" if writable else "ro", "nosuid", "nodev", "rbind"]}


def _partition_file(layout: Layout, partition: str) -> str:
    return os.path.join(layout.config_dir, f"{partition}.conf")


def _preload_file(layout: Layout) -> str:
    return os.path.join(layout.config_dir, "ld.so.preload")


def _container_shims(layout: Layout) -> list[tuple[str, str]]:
    """(host path, container path) of the shims, driver shim first."""
    out = [(layout.shim, f"{LIBRARY_DIR}/libfracgpu.so")]
    if layout.nvml_shim:
        out.append((layout.nvml_shim, f"{LIBRARY_DIR}/libfracgpu-nvml.so"))
    return out


def partition_config(layout: Layout, partition: str) -> dict[str, str]:
    """The node configuration a container of ``partition`` gets, by variable name."""
    values = {settings.STATE_DIR: STATE_DIR, settings.PARTITION: partition,
              settings.REAL_LIBCUDA: f"{DRIVER_DIR}/libcuda.so.1"}
    if layout.nvml:
        values[settings.REAL_LIBNVML] = f"{DRIVER_DIR}/libnvidia-ml.so.1"
    if layout.state_group:
        values[settings.STATE_GROUP] = layout.state_group
    return values


def _devices(partitions: Iterable[str], names: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """(partition, CDI device name) of each partition CDI can name: its own name, or ``names[partition]``."""
    out = []
    for partition in partitions:
        try:
            out.append((partition, device_name((names or {}).get(partition, partition))))
        except Refused:
            continue
    return out


def spec(layout: Layout, partitions: Iterable[str], kind: str = KIND,
         names: Mapping[str, str] | None = None) -> dict:
    """The CDI spec of ``partitions`` (each one device, named after it, or ``names[partition]``) on
    ``layout``, as a JSON-ready dict. Partitions CDI cannot name are left out (``qualified_names``
    says which are in)."""
    common = [_mount(host, inside) for host, inside in _container_shims(layout)]
    common.append(_mount(_preload_file(layout), PRELOAD))
    common.append(_mount(layout.driver, f"{DRIVER_DIR}/libcuda.so.1"))
    if layout.nvml:
        common.append(_mount(layout.nvml, f"{DRIVER_DIR}/libnvidia-ml.so.1"))
    common.append(_mount(layout.state_dir, STATE_DIR, writable=True))
    env = []
    if layout.sim is not None:
        common.append(_mount(layout.sim[settings.SIM_DIR], SIM_DIR, writable=True))
        env = [f"{k}={v}" for k, v in sorted({**layout.sim, settings.SIM_DIR: SIM_DIR}.items())]
    devices = []
    for name, device in _devices(partitions, names):
        edits: dict = {"mounts": [*common, _mount(_partition_file(layout, name), config.PATH)]}
        if env:
            edits["env"] = env
        if layout.device_nodes:
            edits["deviceNodes"] = [{"path": p} for p in layout.device_nodes]
        devices.append({"name": device, "containerEdits": edits})
    out = {"cdiVersion": EARLIEST_VERSION, "kind": check_kind(kind), "devices": devices}
    out["cdiVersion"] = minimum_version(out)
    return out


def minimum_version(cdi_spec: Mapping) -> str:
    """The lowest CDI spec version that carries what ``cdi_spec`` uses, by the CDI project's
    rules: 0.3.0 for env, mounts and device nodes by path; 0.4.0 for a mount's ``type``; 0.5.0
    for a device name not starting with a letter or a device node's ``hostPath``; 0.6.0 for
    annotations or a '.' in the kind's class; 0.7.0 for ``intelRdt``."""
    devices = cdi_spec.get("devices", [])
    edits = [cdi_spec.get("containerEdits") or {}] + [d.get("containerEdits") or {} for d in devices]
    if any("intelRdt" in e for e in edits):
        return "0.7.0"
    if cdi_spec.get("annotations") or any(d.get("annotations") for d in devices) \
            or "." in cdi_spec.get("kind", "").partition("/")[2]:
        return "0.6.0"
    if any(d.get("name", "a")[:1].isalpha() is False for d in devices) \
            or any(n.get("hostPath") for e in edits for n in e.get("deviceNodes", [])):
        return "0.5.0"
    if any(m.get("type") for e in edits for m in e.get("mounts", [])):
        return "0.4.0"
    return EARLIEST_VERSION


def default_spec_path(kind: str = KIND, root: str = SPEC_DIR, suffix: str = "") -> str:
    """``/var/run/cdi/fracgpu.dev-partition.json`` for the kind ``fracgpu.dev/partition``: a spec file of
    ``kind`` in ``root``, its name the kind's with ``suffix`` (one spec file per claim, say) before ``.json``."""
    return os.path.join(root, kind.replace("/", "-") + suffix + ".json")


def write_spec(layout: Layout, partitions: Iterable[str], path: str | None = None, kind: str = KIND,
               names: Mapping[str, str] | None = None) -> dict:
    """Writes the spec of ``partitions`` (devices named as ``spec`` names them) to ``path``
    (default ``default_spec_path``) and the files it mounts (each partition's node configuration,
    the ld.so.preload) under ``layout.config_dir``, each atomically (a temporary file renamed into
    place: a runtime reading it meanwhile sees the old file or the new one). Returns the spec."""
    partitions = list(partitions)
    made = spec(layout, partitions, kind, names)
    preload = "\n".join(inside for _, inside in _container_shims(layout)) + "\n"
    files.write_atomically(_preload_file(layout), preload, 0o644)
    for name, device in _devices(partitions, names):
        files.write_atomically(_partition_file(layout, name),
                          config.text(partition_config(layout, name),
                                      comment=f"fracgpu: a container given CDI device {kind}={device} is in "
                                              f"partition '{name}'"), 0o644)
    write_spec_file(path or default_spec_path(kind), made)
    return made


def write_spec_file(path: str, cdi_spec: dict) -> None:
    """Writes the CDI spec ``cdi_spec`` to ``path`` atomically (a runtime sees the old file or the new one)."""
    files.write_atomically(path, json.dumps(cdi_spec, indent=2) + "\n", 0o644)


def remove_spec(layout: Layout, partitions: Iterable[str], path: str) -> None:
    """Removes a spec ``write_spec`` wrote to ``path`` for ``partitions``, and their node configuration
    files (not the ld.so.preload, which every spec of the node mounts). What is already gone is fine."""
    for name in partitions:
        files.remove(_partition_file(layout, name))
    files.remove(path)
