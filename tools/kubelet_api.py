#!/usr/bin/env python3
"""The kubelet's gRPC APIs that fracgpu serves and calls, as Python stubs.

The ``.proto`` files in ``src/fracgpu/kube/api`` are the kubelet's own, as
published in ``k8s.io/kubelet`` at ``VERSION`` (each file's first line names its
source path); only the file names differ, so that the stubs import as
``fracgpu.kube.api.<name>_pb2``. The proto packages, and so the gRPC method
paths the kubelet uses, are theirs.

    python tools/kubelet_api.py           writes the stubs (grpcio-tools)
    python tools/kubelet_api.py --check   exits 1 when a stub is not what the .proto makes
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

VERSION = "v0.36.3"   # k8s.io/kubelet, for Kubernetes 1.36.3
ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
API = SRC / "fracgpu" / "kube" / "api"
# Our file name -> the path of the kubelet's file in k8s.io/kubelet.
FILES = {
    "dra_v1": "pkg/apis/dra/v1/api.proto",
    "dra_v1beta1": "pkg/apis/dra/v1beta1/api.proto",
    "pluginregistration_v1": "pkg/apis/pluginregistration/v1/api.proto",
    "deviceplugin_v1beta1": "pkg/apis/deviceplugin/v1beta1/api.proto",
    "podresources_v1": "pkg/apis/podresources/v1/api.proto",
}
OUTPUTS = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: pathlib.Path) -> None:
    from grpc_tools import protoc   # the test extra's grpcio-tools
    import importlib.resources
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    for name in FILES:
        proto = f"fracgpu/kube/api/{name}.proto"
        args = ["protoc", f"-I{SRC}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", proto]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        made = pathlib.Path(tmp) / "fracgpu" / "kube" / "api"
        stale = []
        for name in FILES:
            for suffix in OUTPUTS:
                new = (made / (name + suffix)).read_text()
                path = API / (name + suffix)
                if not path.exists() or path.read_text() != new:
                    stale.append(path.relative_to(ROOT))
                    if not args.check:
                        path.write_text(new)
    if args.check and stale:
        print("stale, run tools/kubelet_api.py: " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
