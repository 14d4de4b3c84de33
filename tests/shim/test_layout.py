"""The driver shim's source reads as its header says: shim.h's layer map names every file of it, and
the native folders show the 2x2 of shim and simulated GPU, driver and NVML."""

from __future__ import annotations

from tests.support import ROOT

CSRC = ROOT / "csrc"


def test_the_layer_map_names_every_file_of_the_driver_shim():
    header = (CSRC / "shim" / "cuda" / "shim.h").read_text()
    layer_map = header.split("#pragma once", 1)[0]   # the opening comment
    sources = sorted(p.name for p in (CSRC / "shim" / "cuda").glob("*.cpp"))
    assert sources and [name for name in sources if name not in layer_map] == []


def test_the_native_folders_show_the_two_by_two():
    assert all((CSRC / side / api).is_dir() for side in ("shim", "sim") for api in ("cuda", "nvml"))
