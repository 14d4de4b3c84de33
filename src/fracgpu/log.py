"""One line per event on stderr, for the services (the exporter, the Slurm prolog): text for a person,
or JSON for a log pipeline, as ``FRACGPU_LOG_FORMAT`` (or a command's ``--log-format``) says.

A JSON line is one object with the fields a pipeline keys on, the same the shim's own refusals carry:
``time`` (ISO 8601, UTC), ``level`` (``info``, ``warning``, ``error``), ``component`` (``exporter``,
``slurm-prolog``, ``shim``), ``gpu`` (UUID), ``partition``, ``job`` (a number: the Slurm job id;
in the shim's lines, the pid of the process recording the job, its ledger row's recorder), ``pid``,
``event`` (a fixed word: ``serving``, ``state-unreadable``, ``refused``, ...), ``message`` (the
text line) and ``figures`` (numbers: bytes, counts). Fields that do not apply are null.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from fracgpu import settings

__all__ = ["FORMATS", "emit", "set_format", "current_format"]

FORMATS = ("text", "json")
_chosen: str | None = None   # a command's --log-format, over FRACGPU_LOG_FORMAT


def set_format(chosen: str | None) -> None:
    """Use ``chosen`` (``text`` or ``json``) from now on; None: ``FRACGPU_LOG_FORMAT`` decides again."""
    global _chosen
    if chosen is not None and chosen not in FORMATS:
        raise ValueError(f"invalid log format {chosen!r}: write text or json")
    _chosen = chosen


def current_format(env: Mapping[str, str] | None = None) -> str:
    """``text`` or ``json``: the one chosen, else ``FRACGPU_LOG_FORMAT``, else text. ValueError names a bad
    ``FRACGPU_LOG_FORMAT``."""
    if _chosen is not None:
        return _chosen
    return settings.read(settings.LOG_FORMAT, os.environ if env is None else env) or "text"


def emit(component: str, event: str, message: str, *, level: str = "info", gpu: str | None = None,
         partition: str | None = None, job: int | None = None, figures: Mapping[str, Any] | None = None,
         stream: IO[str] | None = None) -> None:
    """Write one line: ``fracgpu COMPONENT: MESSAGE`` as text, or the JSON object (see the module)."""
    stream = sys.stderr if stream is None else stream
    if current_format() == "json":
        line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                           "level": level, "component": component, "gpu": gpu, "partition": partition,
                           "job": job, "pid": os.getpid(), "event": event, "message": message,
                           "figures": dict(figures or {})})
    else:
        line = f"fracgpu {component}: {message}"
    print(line, file=stream, flush=True)
