"""The CDI spec of a node's partitions: valid by the CDI project's own JSON schema, at the lowest
cdiVersion its edits need, written atomically, one device per partition."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from fracgpu import cdi, config, settings
from tests.support import ROOT

# Where Debian's package of the CDI project's Go sources installs its JSON schema, and where
# .ci/run unpacks that package instead of installing it (its dependencies would change the machine).
SCHEMA_SUBPATH = "usr/share/gocode/src/github.com/container-orchestrated-devices/container-device-interface/schema"
SCHEMA_FOLDERS = [pathlib.Path("/") / SCHEMA_SUBPATH, ROOT / "build" / "cdi-schema" / SCHEMA_SUBPATH]


def layout(tmp_path, **changes) -> cdi.Layout:
    values = dict(shim="/opt/fracgpu/libfracgpu.so", nvml_shim="/opt/fracgpu/libfracgpu-nvml.so",
                  driver="/usr/lib/x86_64-linux-gnu/libcuda.so.1", nvml="/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                  state_dir="/var/lib/fracgpu", config_dir=str(tmp_path / "cdi"), state_group="gpu",
                  device_nodes=("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"))
    values.update(changes)
    return cdi.Layout(**values)


def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    folder = next((f for f in SCHEMA_FOLDERS if (f / "schema.json").is_file()), None)
    if folder is None:
        pytest.skip("the CDI JSON schema is not here: `.ci/run python` unpacks Debian's "
                    "golang-github-container-orchestrated-devices-container-device-interface-dev into build/cdi-schema")
    schema = json.loads((folder / "schema.json").read_text())
    defs = referencing.Resource.from_contents(json.loads((folder / "defs.json").read_text()),
                                              default_specification=referencing.jsonschema.DRAFT7)
    registry = referencing.Registry().with_resource("defs.json", defs)
    return jsonschema.Draft7Validator(schema, registry=registry)


@pytest.mark.parametrize("simulated", [False, True], ids=["gpu", "simulated"])
def test_the_spec_is_valid_by_the_cdi_projects_schema(tmp_path, simulated):
    validator = schema_validator()
    sim = {settings.SIM_DIR: "/tmp/sim", settings.SIM_MEMORY: str(16 << 30)} if simulated else None
    spec = cdi.spec(layout(tmp_path, sim=sim, device_nodes=() if simulated else layout(tmp_path).device_nodes),
                    ["team-a", "b"])
    errors = sorted(validator.iter_errors(spec), key=str)
    assert not errors, [e.message for e in errors]
    # ... and the schema does catch a spec that is not one.
    assert list(validator.iter_errors({"cdiVersion": "0.3.0", "kind": cdi.KIND, "devices": [{"name": "a"}]}))


def test_each_partition_is_one_device_bound_by_its_mounted_node_file(tmp_path):
    spec = cdi.write_spec(layout(tmp_path), ["team-a", "b"], str(tmp_path / "spec.json"))
    assert json.loads((tmp_path / "spec.json").read_text()) == spec
    assert spec["kind"] == "fracgpu.dev/partition" and [d["name"] for d in spec["devices"]] == ["team-a", "b"]
    (device, _) = spec["devices"]
    mounts = {m["containerPath"]: m for m in device["containerEdits"]["mounts"]}
    assert mounts["/etc/fracgpu/fracgpu.conf"]["hostPath"] == str(tmp_path / "cdi" / "team-a.conf")
    assert all("ro" in m["options"] for path, m in mounts.items() if path != cdi.STATE_DIR)
    assert "rw" in mounts[cdi.STATE_DIR]["options"] and mounts[cdi.STATE_DIR]["hostPath"] == "/var/lib/fracgpu"
    assert [n["path"] for n in device["containerEdits"]["deviceNodes"]] == ["/dev/nvidiactl", "/dev/nvidia-uvm",
                                                                           "/dev/nvidia0"]
    # The mounted file, read by the shim's own parser, binds the container to its partition.
    bound = config.read(str(tmp_path / "cdi" / "team-a.conf"))
    assert bound.partition == "team-a" and bound.get(settings.STATE_DIR) == cdi.STATE_DIR
    assert bound.get(settings.STATE_GROUP) == "gpu"
    assert (tmp_path / "cdi" / "ld.so.preload").read_text().split() == ["/usr/lib/fracgpu/libfracgpu.so",
                                                                        "/usr/lib/fracgpu/libfracgpu-nvml.so"]
    # Written atomically: no temporary file is left beside them.
    assert not [p for p in os.listdir(tmp_path / "cdi") if p.endswith(".tmp")]


def test_a_device_may_be_named_apart_from_its_partition_and_its_spec_removed(tmp_path):
    """A Kubernetes claim's device is named after the claim (``<uid>-gpu0``), its partition after the
    claim too but with a prefix; the device binds the container to the partition all the same."""
    uid = "0f4c6a52-8d0e-4f7b-9a35-6a1d2b3c4d5e"
    path = str(tmp_path / "claim.json")
    spec = cdi.write_spec(layout(tmp_path), [f"k8s-claim-{uid}-gpu0"], path, "k8s.gpu.fracgpu.dev/claim",
                          names={f"k8s-claim-{uid}-gpu0": f"{uid}-gpu0"})
    assert [d["name"] for d in spec["devices"]] == [f"{uid}-gpu0"]
    assert spec["cdiVersion"] == "0.5.0"   # a device name that starts with a digit, as a UID may
    bound = config.read(str(tmp_path / "cdi" / f"k8s-claim-{uid}-gpu0.conf"))
    assert bound.partition == f"k8s-claim-{uid}-gpu0"
    cdi.remove_spec(layout(tmp_path), [f"k8s-claim-{uid}-gpu0"], path)
    assert not os.path.exists(path) and not (tmp_path / "cdi" / f"k8s-claim-{uid}-gpu0.conf").exists()
    cdi.remove_spec(layout(tmp_path), [f"k8s-claim-{uid}-gpu0"], path)   # what is gone already is fine


@pytest.mark.parametrize("change, version", [
    ({}, "0.3.0"),
    ({"mount_type": "bind"}, "0.4.0"),
    ({"names": ["7b"]}, "0.5.0"),
    ({"host_path": "/dev/nvidia0"}, "0.5.0"),
    ({"kind": "fracgpu.dev/gpu.partition"}, "0.6.0"),
    ({"annotations": {"a": "b"}}, "0.6.0"),
])
def test_the_spec_carries_the_lowest_cdi_version_its_edits_need(tmp_path, change, version):
    spec = cdi.spec(layout(tmp_path), change.get("names", ["team-a"]), change.get("kind", cdi.KIND))
    edits = spec["devices"][0]["containerEdits"]
    if "mount_type" in change:
        edits["mounts"][0]["type"] = change["mount_type"]
    if "host_path" in change:
        edits["deviceNodes"][0]["hostPath"] = change["host_path"]
    if "annotations" in change:
        spec["annotations"] = change["annotations"]
    assert cdi.minimum_version(spec) == version
    if len(change) <= 1 and ("names" in change or "kind" in change or not change):
        assert spec["cdiVersion"] == version   # what spec() writes


def test_partitions_cdi_cannot_name_are_left_out(tmp_path):
    spec = cdi.spec(layout(tmp_path), ["ok", "ends-with-", "x_"])
    assert [d["name"] for d in spec["devices"]] == ["ok"]
    assert cdi.qualified_names(["ok", "x_"], "v.dev/c") == ["v.dev/c=ok"]


@pytest.mark.fault("`fracgpu cdi generate --kind` with something that is not a CDI kind (no class, spaces, a '/' too many)",
                   "refused naming the form (vendor/class), no spec written")
@pytest.mark.parametrize("kind", ["fracgpu.dev", "fracgpu dev/partition", "fracgpu.dev/a/b", "-x.dev/partition", ""])
def test_a_kind_cdi_does_not_accept_is_refused(tmp_path, kind):
    with pytest.raises(cdi.Refused, match="is not a CDI kind: write vendor/class"):
        cdi.write_spec(layout(tmp_path), ["a"], str(tmp_path / "spec.json"), kind)
    assert not (tmp_path / "spec.json").exists()
