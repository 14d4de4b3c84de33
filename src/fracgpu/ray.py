"""Enforced fractional GPUs in Ray: a task's ``num_gpus`` becomes its memory quota and compute share.

Ray schedules ``num_gpus=0.25`` but enforces nothing: its own docs say
resource requests do not limit what a task uses. Here each such task or actor
runs its Ray worker under ``fracgpu run`` on the GPU Ray gave it, with
``--memory`` and ``--compute`` equal to its fraction, and is recorded in the
ledger as a job labelled with its Ray job and task (or actor) name. One line::

    import fracgpu.ray

    @fracgpu.ray.remote(num_gpus=0.25)        # instead of @ray.remote(num_gpus=0.25)
    def train(...): ...

or, for an existing remote function or actor class,
``f.options(**fracgpu.ray.options(0.25, name="train"))``.

How: through Ray's own extension points. ``options()`` sets the runtime
environment's ``py_executable`` (Ray starts the worker with that command),
which needs no cluster configuration; clusters that register
``fracgpu.ray.FracGPUPlugin`` in ``RAY_RUNTIME_ENV_PLUGINS`` can write
``runtime_env={"fracgpu": {"num_gpus": 0.25}}`` instead, and the plugin does
the same.

What the ledger shows: a job is one worker process, the process that
``fracgpu run`` starts and whose memory and time count against its partition,
so every task that worker runs is held to the quota. ``remote()`` declares
tasks with ``max_calls=1``: the worker serves one task and exits, so every
task is a job of its own. ``.options()`` cannot set ``max_calls`` (Ray refuses
it there); the function keeps what it was declared with. Ray already declares
``max_calls=1`` for ``@ray.remote(num_gpus=N)`` with N > 0, so each task is
again a job; a function declared without GPUs (``max_calls=0``) runs in a
worker Ray reuses for later tasks with the same runtime environment in the
same Ray job, and that worker is one job, labelled with the name, for all of
them; while it waits idle it keeps its partition and whatever memory it
still holds. An actor is one job for its life.
"""

from __future__ import annotations

import inspect
import shlex
import sys
from typing import Any

from fracgpu.units import parse_priority, parse_share, percent_text

__all__ = ["options", "remote", "runtime_env", "worker_command", "FracGPUPlugin"]


def _fraction(num_gpus: float) -> float:
    """``num_gpus`` as a share of one GPU (the share grammar of ``units.parse_share``, for a number)."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)):
        raise TypeError(f"num_gpus must be a number like 0.25, not {num_gpus!r}")
    try:
        return parse_share(num_gpus)
    except ValueError:
        raise ValueError(f"num_gpus={num_gpus!r}: fracgpu shares one GPU, so give a fraction in (0, 1]; a task "
                         "that needs whole GPUs needs no sharing (use ray.remote(num_gpus=N) as it is)") from None


def worker_command(num_gpus: float, *, name: str = "ray", cap: bool = False, labels: dict[str, str] | None = None,
                   python: str | None = None, priority: str | None = None) -> str:
    """The command Ray starts the worker with (its ``py_executable``): ``fracgpu run`` with the
    fraction as memory quota and compute share (and ``priority``, when given, as its class), then
    the Python that runs the worker (``python``, a shell command as Ray's runtime environment has
    it; default this interpreter). ValueError for a bad fraction or priority."""
    fraction = _fraction(num_gpus)
    share = percent_text(fraction)
    argv = [sys.executable, "-m", "fracgpu", "run", "--memory", share, "--compute", share]
    if cap:
        argv.append("--cap")
    if priority is not None:
        argv += ["--priority", parse_priority(priority)]
    argv += ["--name", name]
    for key, value in sorted((labels or {}).items()):
        argv += ["--label", f"{key}={value}"]
    # `python` is a command as Ray writes it (it may have arguments of its own): kept as it is.
    return shlex.join(argv) + " -- " + (python or shlex.quote(sys.executable))


def _ray_job_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:   # outside a Ray driver: no job to label with
        return None
    return None


def runtime_env(num_gpus: float, *, name: str = "ray", cap: bool = False,
                base: dict[str, Any] | None = None, priority: str | None = None) -> dict[str, Any]:
    """A Ray runtime environment (``base`` plus what fracgpu needs) that runs the worker under
    a quota and share of ``num_gpus`` of its GPU."""
    if base and "py_executable" in base:
        raise ValueError("the runtime_env already sets py_executable; fracgpu needs it to start the worker "
                         "under its quota")
    labels = {"ray_name": name}
    job = _ray_job_id()
    if job:
        labels["ray_job_id"] = job
    env = dict(base or {})
    env["py_executable"] = worker_command(num_gpus, name=name, cap=cap, labels=labels, priority=priority)
    return env


def options(num_gpus: float, *, name: str = "ray", cap: bool = False, actor: bool = False,
            runtime_env_base: dict[str, Any] | None = None, priority: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``.options(...)`` of a remote function or actor class (and for
    ``ray.remote(...)``): the fraction as Ray's ``num_gpus``, and the runtime environment that
    enforces and records it. Only options Ray takes in ``.options()`` for tasks and actors
    alike, so ``max_calls`` is not among them (see the module's note on what the ledger then
    shows); ``actor`` is accepted for callers that say which they mean, and changes nothing.
    ``priority`` (``"high"``, ``"normal"``, ``"low"``): the worker's class at the launch gate."""
    del actor   # the same keywords suit both: Ray's .options() refuses max_calls for tasks
    return {"num_gpus": _fraction(num_gpus),
            "runtime_env": runtime_env(num_gpus, name=name, cap=cap, base=runtime_env_base, priority=priority)}


def remote(*, num_gpus: float, cap: bool = False, priority: str | None = None, **ray_options: Any):
    """``@fracgpu.ray.remote(num_gpus=0.25)``: ``ray.remote`` with the fraction enforced and
    the task or actor (by its name) recorded in the ledger. A task gets ``max_calls=1`` (its
    worker serves it alone, so each task is a job of its own) unless ``max_calls`` is given.
    ``priority="high"`` serves it before normal and low work (a bad class: ValueError, here)."""
    import ray

    if priority is not None:
        parse_priority(priority)

    def wrap(target):
        name = getattr(target, "__qualname__", getattr(target, "__name__", "ray"))
        rest = dict(ray_options)   # the decorator may wrap several targets: each gets all of them
        kwargs = options(num_gpus, name=name, cap=cap, runtime_env_base=rest.pop("runtime_env", None),
                         priority=priority)
        if not inspect.isclass(target):
            kwargs["max_calls"] = rest.pop("max_calls", 1)
        return ray.remote(**kwargs, **rest)(target)

    return wrap


try:   # the plugin, for clusters that register it (RAY_RUNTIME_ENV_PLUGINS)
    from ray._private.runtime_env.plugin import RuntimeEnvPlugin as _PluginBase
except Exception:   # Ray not installed: everything above still works, without the plugin
    _PluginBase = object


class FracGPUPlugin(_PluginBase):
    """Ray runtime-env plugin: ``runtime_env={"fracgpu": {"num_gpus": 0.25, "name": "...", "cap": False}}``
    starts the worker under ``fracgpu run`` with that fraction. Register it on the cluster with
    ``RAY_RUNTIME_ENV_PLUGINS='[{"class": "fracgpu.ray.FracGPUPlugin"}]'``."""

    name = "fracgpu"
    priority = 90   # after the plugins that choose the Python (conda, pip, py_executable)

    @staticmethod
    def validate(runtime_env_dict: dict) -> dict:
        spec = runtime_env_dict.get("fracgpu")
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = {"num_gpus": spec}
        if not isinstance(spec, dict) or "num_gpus" not in spec:
            raise ValueError('runtime_env["fracgpu"] must be {"num_gpus": FRACTION} (optionally "name", "cap", '
                             '"priority")')
        _fraction(spec["num_gpus"])
        if spec.get("priority") is not None:
            parse_priority(spec["priority"])
        return spec

    def get_uris(self, runtime_env) -> list[str]:
        return []

    async def create(self, uri, runtime_env, context, logger=None) -> float:
        return 0

    def modify_context(self, uris, runtime_env, context, logger=None) -> None:
        spec = self.validate(dict(runtime_env))
        context.py_executable = worker_command(spec["num_gpus"], name=str(spec.get("name", "ray")),
                                               cap=bool(spec.get("cap", False)), priority=spec.get("priority"),
                                               python=context.py_executable)
