"""Jobs that exercise a node: what runs on a GPU to show fracgpu at work or to grade it.

None of it is the library's API; the library and the command line start these as jobs.

- ``check``: a node's guarantees graded on its GPU (``fracgpu check``), by the probe jobs in ``probes``;
- ``latency``: the latency probe (a request loop beside a trainer, in priority classes);
- ``demo``: the demo's jobs (``fracgpu demo``);
- ``driver``: the small ctypes client of ``libcuda.so.1`` those jobs use;
- ``device_probe``: the devices the driver lists, run by path as its own bare interpreter
  (``python -S``), so it imports nothing here, and nothing is imported by this package.
"""
