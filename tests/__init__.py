"""fracgpu's tests, one folder per layer (``python -m pytest`` runs them all):

- ``lib/``: library modules called directly: sizes and shares, the ledger, the
  state file reader, and the README tables generated from the code.
- ``cli/``: the ``fracgpu`` commands, run as a user runs them.
- ``shim/``: what the shims enforce and count inside jobs: memory quotas,
  compute shares, NVML, accounting, ``fracgpu.init()``, faults and load.
- ``sim/``: the simulated GPU itself: its clients, its faults, ``fracgpu sim``.
- ``integrations/``: fracgpu inside other frameworks (Ray).
- ``packaging/``: the wheel, installed where no compiler is, and the build's own refusals.
- ``gpu/``: the same on a real NVIDIA GPU (marked ``gpu``; skipped without one).
- ``native/``, ``fuzz/``: the C and C++ tests and the fuzzer, built by CMake.
- ``clients/``: the C driver client the tests compile.
- ``support/``: helpers shared with the benchmarks (``tests.support.simgpu``);
  ``conftest.py`` makes its fixtures available to every test.
"""
