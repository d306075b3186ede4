"""Content-addressed blob store for segment artifacts, with a quota and LRU eviction.

Problem
-------
Each agent keeps the unit blobs of the segments it runs, and serves them to peers so a model is
read from disk once and then shared over the LAN. Blobs arrive in chunks over connections that
can drop, disks fill up, and files can rot. A half-written or corrupt blob must never be loaded
as valid, and a blob a loaded segment is using must never be evicted under it.

Rules
-----
* A blob's name is the sha256 of its bytes (64 lowercase hex digits; anything else is rejected
  before it can become a path). ``put`` and ``finish`` hash the bytes before the blob becomes
  visible; ``load`` and ``verify`` hash them again, so bit rot is caught when a segment loads.
* Complete blobs live in ``<root>/blobs/<sha256>``. A blob becomes visible only through
  ``os.replace`` of a fsynced file in the same directory, followed by a fsync of the directory, so
  after a crash a name in ``blobs/`` always holds complete bytes (they are still re-hashed on load).
* Chunked transfers write ``<root>/partial/<sha256>.part``. ``partial_size`` tells a receiver
  where to resume after a dropped connection or a restart; ``write_chunk`` accepts an offset at or
  before the current end (a resent chunk overwrites), never a gap. ``finish`` checks the size and
  the hash; on a mismatch it deletes the partial file and raises :class:`CorruptBlobError`, and
  the caller fetches the blob again from the start.
* Quota: complete blobs plus partial files may not exceed ``quota_bytes``. When a write needs room,
  the least recently used unpinned blobs are evicted first. Pinned blobs (``pin``/``unpin``,
  counted, for segments that are loaded) are never evicted; when only pinned blobs remain,
  :class:`StoreFullError` says how much is pinned. Recency survives restarts through file mtimes.
* A full disk (``ENOSPC``/``EDQUOT``) raises :class:`StoreFullError`; for ``put`` the temporary
  file is removed, for chunks the partial file is truncated back to its last good size.

All methods are synchronous file I/O; an asyncio agent calls them from a worker thread. A lock
keeps the bookkeeping consistent when several threads use one store.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# Read size for hashing and copying: large enough that syscall cost is negligible, small enough
# to keep memory flat while hashing a 50 MB blob.
HASH_CHUNK_BYTES = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class BlobStoreError(RuntimeError):
    """A store operation failed; the message names the blob and what to do."""


class BlobNotFoundError(BlobStoreError, KeyError):
    """The requested blob is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "blob not found"


class CorruptBlobError(BlobStoreError):
    """Stored or received bytes do not hash to their name; the blob was deleted, fetch it again."""


class StoreFullError(BlobStoreError):
    """The quota or the disk has no room for a write."""


@dataclass(frozen=True)
class StoreUsage:
    """Bytes and counts in a store at one moment."""

    used_bytes: int
    quota_bytes: int
    blob_count: int
    blob_bytes: int
    pinned_bytes: int
    partial_bytes: int


def check_sha(sha: str) -> str:
    """Return ``sha`` if it is 64 lowercase hex digits, else raise ValueError."""
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise ValueError(f"invalid blob id {sha!r:.80}: expected a sha256 as 64 lowercase hex digits")
    return sha


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore:
    """Blobs named by sha256 under ``root``, at most ``quota_bytes`` in total."""

    def __init__(self, root: Path | str, quota_bytes: int) -> None:
        if quota_bytes <= 0:
            raise ValueError(f"quota_bytes={quota_bytes} is invalid: use a positive number of bytes")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self._blobs_dir = self.root / "blobs"
        self._partial_dir = self.root / "partial"
        self._blobs_dir.mkdir(parents=True, exist_ok=True)
        self._partial_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._partials: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._scan()

    # --- startup --------------------------------------------------------------------------------

    def _scan(self) -> None:
        entries: list[tuple[float, str, int]] = []
        for path in self._blobs_dir.iterdir():
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # a put interrupted by a crash
                continue
            if not _SHA_RE.match(path.name):
                logger.warning("ignoring unexpected file %s in blob store", path)
                continue
            stat = path.stat()
            entries.append((stat.st_mtime, path.name, stat.st_size))
        for _, sha, size in sorted(entries):
            self._sizes[sha] = size
        for path in self._partial_dir.iterdir():
            sha = path.name.removesuffix(".part")
            if path.suffix == ".part" and _SHA_RE.match(sha):
                self._partials[sha] = path.stat().st_size
        logger.info(
            "blob store at %s: %d blobs, %d partial, %d of %d bytes used",
            self.root, len(self._sizes), len(self._partials), self._used(), self.quota_bytes,
        )  # fmt: skip

    # --- queries --------------------------------------------------------------------------------

    def _blob_path(self, sha: str) -> Path:
        return self._blobs_dir / check_sha(sha)

    def _partial_path(self, sha: str) -> Path:
        return self._partial_dir / (check_sha(sha) + ".part")

    def _used(self) -> int:
        return sum(self._sizes.values()) + sum(self._partials.values())

    def has(self, sha: str) -> bool:
        """Return True when the complete blob is stored (its bytes are not re-hashed here)."""
        check_sha(sha)
        with self._lock:
            return sha in self._sizes

    def size(self, sha: str) -> int:
        """Return the size of a stored blob in bytes."""
        with self._lock:
            try:
                return self._sizes[check_sha(sha)]
            except KeyError:
                raise BlobNotFoundError(f"blob {sha} is not in the store at {self.root}") from None

    def path(self, sha: str) -> Path:
        """Return the path of a stored blob and mark it recently used."""
        with self._lock:
            if check_sha(sha) not in self._sizes:
                raise BlobNotFoundError(f"blob {sha} is not in the store at {self.root}")
            self._touch(sha)
            return self._blob_path(sha)

    def usage(self) -> StoreUsage:
        with self._lock:
            blob_bytes = sum(self._sizes.values())
            partial_bytes = sum(self._partials.values())
            pinned = sum(self._sizes.get(sha, 0) for sha in self._pins)
            return StoreUsage(blob_bytes + partial_bytes, self.quota_bytes, len(self._sizes), blob_bytes, pinned, partial_bytes)

    def _touch(self, sha: str) -> None:
        self._sizes.move_to_end(sha)
        try:
            os.utime(self._blob_path(sha))
        except OSError as exc:  # recency is advisory; a failed utime must not fail a read
            logger.debug("could not update mtime of blob %s: %s", sha, exc)

    # --- pins and eviction ----------------------------------------------------------------------

    def pin(self, sha: str) -> None:
        """Protect a stored blob from eviction until a matching ``unpin`` (pins are counted)."""
        with self._lock:
            if check_sha(sha) not in self._sizes:
                raise BlobNotFoundError(f"cannot pin blob {sha}: it is not in the store")
            self._pins[sha] = self._pins.get(sha, 0) + 1

    def unpin(self, sha: str) -> None:
        with self._lock:
            count = self._pins.get(check_sha(sha), 0)
            if count <= 1:
                self._pins.pop(sha, None)
            else:
                self._pins[sha] = count - 1

    def pinned(self, sha: str) -> bool:
        with self._lock:
            return check_sha(sha) in self._pins

    def _make_room(self, needed: int, for_sha: str) -> None:
        """Evict least recently used unpinned blobs until ``needed`` more bytes fit the quota."""
        if needed > self.quota_bytes:
            raise StoreFullError(
                f"blob {for_sha} needs {needed} bytes, more than the whole store quota of {self.quota_bytes}; "
                "raise store.quota_bytes"
            )
        while self._used() + needed > self.quota_bytes:
            victim = next((sha for sha in self._sizes if sha not in self._pins and sha != for_sha), None)
            if victim is None:
                usage = self.usage()
                raise StoreFullError(
                    f"blob {for_sha} needs {needed} bytes but only {self.quota_bytes - usage.used_bytes} are free "
                    f"and {usage.pinned_bytes} bytes are pinned by loaded segments; unload segments or raise "
                    "store.quota_bytes"
                )
            self._delete_locked(victim)
            logger.info("evicted blob %s (least recently used) to make room for blob %s", victim, for_sha)

    def _delete_locked(self, sha: str) -> None:
        self._blob_path(sha).unlink(missing_ok=True)
        self._sizes.pop(sha, None)

    def delete(self, sha: str) -> None:
        """Remove a blob; raise BlobStoreError if it is pinned."""
        with self._lock:
            if check_sha(sha) in self._pins:
                raise BlobStoreError(f"blob {sha} is pinned by a loaded segment; unpin it first")
            self._delete_locked(sha)

    # --- whole blobs ----------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview, expected_sha256: str | None = None) -> Path:
        """Store ``data`` under its sha256 and return the blob's path.

        With ``expected_sha256``, bytes hashing to anything else raise CorruptBlobError. Storing a
        blob that is already present writes nothing.
        """
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != check_sha(expected_sha256):
            raise CorruptBlobError(f"received bytes hash to {sha}, expected blob {expected_sha256}; fetch it again")
        with self._lock:
            if sha in self._sizes:
                self._touch(sha)
                return self._blob_path(sha)
            self._make_room(len(data), sha)
            fd, tmp_name = tempfile.mkstemp(dir=self._blobs_dir, prefix=".tmp-")
            tmp = Path(tmp_name)
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self._blob_path(sha))
                _fsync_dir(self._blobs_dir)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                if exc.errno in _DISK_FULL:
                    raise StoreFullError(f"disk full while writing blob {sha} ({len(data)} bytes) under {self.root}") from exc
                raise
            self._sizes[sha] = len(data)
            logger.debug("stored blob %s (%d bytes)", sha, len(data))
            return self._blob_path(sha)

    def load(self, sha: str) -> bytes:
        """Return a blob's bytes after checking their hash; a corrupt blob is deleted and reported."""
        path = self.path(sha)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            self._drop_corrupt(sha)
        return data

    def verify(self, sha: str) -> Path:
        """Re-hash a stored blob and return its path; a corrupt blob is deleted and reported."""
        path = self.path(sha)
        if _hash_file(path) != sha:
            self._drop_corrupt(sha)
        return path

    def _drop_corrupt(self, sha: str) -> None:
        with self._lock:
            self._pins.pop(sha, None)
            self._delete_locked(sha)
        logger.error("blob %s failed its hash check and was deleted; it must be fetched again", sha)
        raise CorruptBlobError(f"stored blob {sha} does not match its hash and was deleted; fetch it again")

    def read_chunk(self, sha: str, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes of a stored blob from ``offset`` (to serve a peer)."""
        total = self.size(sha)
        if offset < 0 or size < 0 or offset > total:
            raise ValueError(f"chunk offset {offset} size {size} is out of range for blob {sha} of {total} bytes")
        with open(self.path(sha), "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    # --- chunked transfers ----------------------------------------------------------------------

    def partial_size(self, sha: str) -> int:
        """Return how many bytes of an unfinished transfer are on disk (0 when none)."""
        with self._lock:
            return self._partials.get(check_sha(sha), 0)

    def write_chunk(self, sha: str, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write a chunk of an incoming blob at ``offset`` and return the new partial size.

        ``offset`` may not lie beyond the current partial size; a chunk starting earlier
        overwrites what is there (a resent chunk), and the file is cut at the chunk's end.
        """
        with self._lock:
            if sha in self._sizes:
                raise BlobStoreError(f"blob {sha} is already complete in the store; do not transfer it again")
            current = self._partials.get(check_sha(sha), 0)
            if offset < 0 or offset > current:
                raise ValueError(
                    f"chunk for blob {sha} starts at offset {offset}, but {current} bytes are stored; "
                    f"resume from offset {current}"
                )
            end = offset + len(data)
            growth = max(0, end - current)
            if growth:
                self._make_room(growth, sha)
            path = self._partial_path(sha)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.lseek(fd, offset, os.SEEK_SET)
                _write_all(fd, data)
                os.ftruncate(fd, end)
            except OSError as exc:
                os.ftruncate(fd, min(offset, current))
                self._partials[sha] = min(offset, current)
                if exc.errno in _DISK_FULL:
                    raise StoreFullError(
                        f"disk full while writing blob {sha} at offset {offset}; kept {min(offset, current)} bytes "
                        "to resume from"
                    ) from exc
                raise
            finally:
                os.close(fd)
            self._partials[sha] = end
            return end

    def finish(self, sha: str, expected_size: int) -> Path:
        """Check an incoming blob's size and hash and make it visible; return its path.

        On a mismatch the partial file is deleted and CorruptBlobError is raised, so the caller
        fetches the blob again from offset 0.
        """
        with self._lock:
            if sha in self._sizes:
                self._discard_partial(sha)
                return self.path(sha)
            size = self._partials.get(check_sha(sha))
            if size is None:
                raise BlobNotFoundError(f"no partial transfer for blob {sha}; send chunks before finish")
            path = self._partial_path(sha)
            if size != expected_size:
                if size < expected_size:
                    raise BlobStoreError(
                        f"blob {sha} has {size} of {expected_size} bytes; resume the transfer from offset {size}"
                    )
                self._discard_partial(sha)
                raise CorruptBlobError(f"blob {sha} received {size} bytes, more than the expected {expected_size}; fetch it again")
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            actual = _hash_file(path)
            if actual != sha:
                self._discard_partial(sha)
                logger.error("received blob %s hashes to %s; deleted it, fetch again", sha, actual)
                raise CorruptBlobError(f"received blob {sha} hashes to {actual}; it was deleted, fetch it again")
            os.replace(path, self._blob_path(sha))
            _fsync_dir(self._blobs_dir)
            self._partials.pop(sha, None)
            self._sizes[sha] = size
            logger.info("received blob %s (%d bytes)", sha, size)
            return self._blob_path(sha)

    def _discard_partial(self, sha: str) -> None:
        self._partial_path(sha).unlink(missing_ok=True)
        self._partials.pop(sha, None)

    def abort(self, sha: str) -> None:
        """Delete an unfinished transfer."""
        with self._lock:
            self._discard_partial(check_sha(sha))
