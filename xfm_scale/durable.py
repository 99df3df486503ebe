"""Writes that survive a node crash, not only a killed process: checkpoints, exports and run files.

A rename alone is atomic for readers, but after a power loss the journal may have committed the
rename before the file's bytes (an empty file under the new name) or lost the rename itself. So
the bytes are flushed before the rename and the folder's entry after it.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (new names, renames), to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: str | Path, *, synced: bool = False) -> None:
    """``os.replace(tmp, path)``, durable. ``synced``: tmp's bytes were already flushed."""
    if not synced:
        fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def write_atomically(path: str | Path, text: str) -> None:
    """Readers see the old file or the new one, never a partial write, also after a node crash."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path, synced=True)
