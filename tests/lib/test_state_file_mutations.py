"""The state file reader on damaged files: a valid region file truncated at
random lengths, and with random bytes of its header and tables changed. Every
open either works or raises StateError with a message; nothing crashes (run in
a child process, so a crash would show as its exit status), and a file that
opens still reads back plain values."""

from __future__ import annotations

import pytest

import subprocess
import sys
import textwrap


@pytest.mark.fault('400 state files truncated or with random bytes changed',
                   'each opens or is refused with a message; the reader never crashes')
def test_damaged_state_files_never_crash_the_reader(tmp_path):
    script = textwrap.dedent(f"""
        import os, random
        from fracgpu import _native
        folder = {str(tmp_path)!r}
        os.chmod(folder, 0o700)
        region = _native.Region.open(folder, "GPU-00000000-0000-4000-8000-000000000001", "test", 1 << 30)
        region.create_partition("team", 1 << 28, 0.25, True)
        path = region.path
        good = open(path, "rb").read()
        rng = random.Random(11)
        opened = refused = 0
        for i in range(400):
            data = bytearray(good)
            if i % 2:
                data = data[:rng.randrange(len(good))]
            else:
                for _ in range(rng.randint(1, 8)):
                    # mostly the header and the partition table, where the reader looks first
                    at = rng.randrange(min(len(data), 8192)) if rng.random() < 0.8 else rng.randrange(len(data))
                    data[at] = rng.randrange(256)
            damaged = os.path.join(folder, "gpu-damaged.state")
            with open(damaged, "wb") as f:
                f.write(data)
            os.chmod(damaged, 0o600)
            try:
                r = _native.Region.open_file(damaged)
                r.partitions(); r.processes()
                opened += 1
            except _native.StateError as e:
                assert str(e) and "state file" in str(e), e
                refused += 1
        print(opened, refused)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    opened, refused = map(int, result.stdout.split())
    assert refused >= 200          # every truncated one, at least
    assert opened + refused == 400
