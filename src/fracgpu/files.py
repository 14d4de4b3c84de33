"""Files other processes read while fracgpu rewrites them: CDI specs, the DRA plugin's checkpoint,
the services' ready files. Each is replaced atomically (a temporary file in the same folder,
synced, renamed into place), so a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["write_atomically", "remove"]


def write_atomically(path: str, text: str, mode: int = 0o644, folder_mode: int = 0o755) -> None:
    """Writes ``text`` to ``path`` atomically, with permissions ``mode``; its folder is made (``folder_mode``)
    when missing."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=folder_mode, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".fracgpu-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def remove(path: str) -> None:
    """Removes ``path``; one already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
