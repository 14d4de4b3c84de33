"""The names the Kubernetes parts find each other's work by, and the kubelet API stubs they speak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fracgpu import kube

ROOT = Path(__file__).resolve().parents[2]
UID = "0f4c6a52-8d0e-4f7b-9a35-6a1d2b3c4d5e"


def test_the_kubelet_api_stubs_are_what_the_kubelets_proto_files_make():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "kubelet_api.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_the_stubs_serve_the_kubelets_method_paths():
    from fracgpu.kube.api import (deviceplugin_v1beta1_pb2, dra_v1_pb2, dra_v1beta1_pb2,
                                  pluginregistration_v1_pb2, podresources_v1_pb2)
    services = {f.services_by_name[name].full_name for f, name in [
        (dra_v1_pb2.DESCRIPTOR, "DRAPlugin"), (dra_v1beta1_pb2.DESCRIPTOR, "DRAPlugin"),
        (pluginregistration_v1_pb2.DESCRIPTOR, "Registration"),
        (deviceplugin_v1beta1_pb2.DESCRIPTOR, "DevicePlugin"), (deviceplugin_v1beta1_pb2.DESCRIPTOR, "Registration"),
        (podresources_v1_pb2.DESCRIPTOR, "PodResourcesLister")]}
    assert services == {"k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin", "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
                        "pluginregistration.Registration", "v1beta1.DevicePlugin", "v1beta1.Registration",
                        "v1.PodResourcesLister"}


def test_a_claims_partition_and_cdi_device_name_the_claim_and_gpu():
    name = kube.claim_partition(UID, 1)
    assert len(name) < 64 and kube.claim_of_partition(name) == (UID, 1)
    qualified = f"{kube.CLAIM_CDI_KIND}={kube.claim_cdi_device(UID, 1)}"
    assert kube.claim_of_cdi_device(qualified) == (UID, 1)
    assert kube.claim_of_cdi_device(f"fracgpu.dev/partition={kube.claim_cdi_device(UID, 1)}") is None
    assert kube.claim_of_partition("team") is None
    with pytest.raises(ValueError, match="not a Kubernetes UID"):
        kube.claim_partition("../etc", 0)


def test_slices_of_one_gpu_name_one_partition_whatever_their_order():
    uuid = "GPU-00000000-0000-0000-0000-000000000001"
    assert kube.parse_slice_id(kube.slice_id(uuid, 3)) == (uuid, 3)
    assert kube.slices_partition(0, [3, 1]) == kube.slices_partition(0, [1, 3]) == "k8s-slices-gpu0-1-3"
    assert kube.is_slices_partition(kube.slices_partition(0, [1, 3]))
    assert kube.slices_of_partition(kube.slices_partition(0, [3, 1])) == (0, frozenset({1, 3}))
    many = kube.slices_partition(2, range(64))
    assert len(many) < 64 and kube.is_slices_partition(many) and many != kube.slices_partition(2, range(63))
    assert kube.slices_of_partition(many) == (2, None) and kube.slices_of_partition("team") is None
    assert not kube.is_slices_partition("team")
