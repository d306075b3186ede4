"""Atomic file replacement for state that must never be read half-written.

Problem: the agent persists small state files (election term and vote, fencing epoch, registry,
probe cache, credentials). A crash or power loss in the middle of a plain `open(path, "w")` leaves
a truncated file that a restarted agent would read as valid, or as garbage.

Rule chosen: write the new content to a temporary file in the same directory, flush and fsync it,
rename it over the target (rename within one filesystem is atomic on POSIX), then fsync the
directory so that the rename itself survives a power loss. A reader therefore sees either the old
content or the new content, never a mix.

Options rejected: writing in place with a checksum (a reader still needs the old copy to recover);
`os.replace` without the directory fsync (ext4 and xfs may lose the rename on power loss even
though the data blocks were flushed).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_directory"]


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk so that a completed rename survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes | bytearray | memoryview, *,
                       mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably.

    The file gets permission bits `mode` (0600 by default, because most state files are private)
    before any byte is written, so a secret is never readable by others even briefly. The
    temporary file is removed when any step fails, and the error propagates.
    """
    target = Path(path)
    directory = target.parent
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    temp_path = Path(temp_name)
    try:
        try:
            os.fchmod(fd, mode)
            handle = os.fdopen(fd, "wb")
        except BaseException:
            # fdopen did not take ownership of the descriptor, so it is closed here.
            os.close(fd)
            raise
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_directory(directory)
    logger.debug("wrote %s atomically (%d bytes)", target, len(data))


def atomic_write_text(path: Path | str, text: str, *, mode: int = 0o600) -> None:
    """Replace `path` with UTF-8 `text` atomically and durably (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path | str, value: Any, *, mode: int = 0o600) -> None:
    """Replace `path` with `value` as indented, key-sorted JSON, atomically and durably."""
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    atomic_write_text(path, text, mode=mode)
