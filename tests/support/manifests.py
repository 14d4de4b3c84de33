"""The deployment's manifests as the tests read them: YAML documents loaded into the official
``kubernetes`` client's models of their kinds (failing on any field a model does not know), and the
``fracgpu`` commands their containers run."""

from __future__ import annotations

import importlib
from pathlib import Path

import click
import yaml
from kubernetes import client

from fracgpu.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"


def load(*paths: Path) -> list[dict]:
    """The YAML documents of ``paths`` (files, or every .yaml below a folder), in order."""
    files = [f for p in paths for f in (sorted(p.rglob("*.yaml")) if p.is_dir() else [p])]
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc is not None]


def model_class(doc: dict):
    """The client's model of ``doc``'s apiVersion and kind (``apps/v1`` DaemonSet: V1DaemonSet), or None."""
    version = doc["apiVersion"].rpartition("/")[2]
    return getattr(client, version[:1].upper() + version[1:] + doc["kind"], None)


def difference(written, loaded, path: str = "") -> str | None:
    """Where ``loaded`` (the model's view) differs from ``written``: the first path, or None."""
    if isinstance(written, dict) and isinstance(loaded, dict):
        for key in written.keys() | loaded.keys():
            if key not in loaded:
                return f"{path}.{key}: not a field of this kind (the model dropped it)"
            if key not in written:
                return f"{path}.{key}: added by the model"
            found = difference(written[key], loaded[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(written, list) and isinstance(loaded, list) and len(written) == len(loaded):
        return next((d for i, (w, m) in enumerate(zip(written, loaded)) if (d := difference(w, m, f"{path}[{i}]"))),
                    None)
    return None if written == loaded else f"{path}: written {written!r}, read back {loaded!r}"


def as_model(doc: dict):
    """``doc`` as its kind's model; fails naming the field when it does not come back as written."""
    cls = model_class(doc)
    assert cls is not None, f"the kubernetes client has no model of {doc['apiVersion']} {doc['kind']}"
    obj = cls.from_dict(doc)
    problem = difference(doc, client.ApiClient().sanitize_for_serialization(obj))
    assert problem is None, f"{doc['kind']} {doc['metadata'].get('name')}: {problem}"
    return obj


def check_service_monitor(doc: dict) -> None:
    """What the Prometheus operator's ServiceMonitor (monitoring.coreos.com/v1) requires, and the types of
    the fields used here."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels"}
    assert isinstance(spec["selector"]["matchLabels"], dict) and spec["selector"]["matchLabels"]
    assert spec["endpoints"], "a ServiceMonitor scrapes its endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "honorLabels", "scheme", "scrapeTimeout"}
        assert isinstance(endpoint["port"], str) and isinstance(endpoint.get("honorLabels", False), bool)


def check_all(docs: list[dict]) -> dict[tuple[str, str], object]:
    """Every document loaded (models by (kind, name)); ServiceMonitors checked and kept as dicts."""
    out = {}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in out, f"{key} twice"
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc)
            out[key] = doc
        else:
            out[key] = as_model(doc)
    return out


def daemonsets(objects: dict) -> list[client.V1DaemonSet]:
    return [o for (kind, _), o in objects.items() if kind == "DaemonSet"]


def cli_command(name: str) -> click.Command | None:
    if name not in COMMANDS:
        return None
    module, _, attribute = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def unknown_options(args: list[str]) -> list[str]:
    """The options of ``fracgpu ARGS...`` (args[0] the command) that its command does not have."""
    options = {opt for p in cli_command(args[0]).params if isinstance(p, click.Option) for opt in p.opts}
    return [a.partition("=")[0] for a in args[1:] if a.partition("=")[0] not in options]
