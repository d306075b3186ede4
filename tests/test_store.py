"""Blob store: hashing, quota with LRU eviction, pins, resumable chunks, corruption, full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent import store as store_module
from nodeagent.store import (
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    CorruptBlobError,
    StoreFullError,
)


def _blob(seed: int, size: int = 1000) -> tuple[bytes, str]:
    data = bytes((seed + i) % 251 for i in range(size))
    return data, hashlib.sha256(data).hexdigest()


def test_store_put_load_roundtrip(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=10_000)
    data, sha = _blob(1)
    path = store.put(data)
    assert path == tmp_path / "blobs" / sha
    assert store.has(sha)
    assert store.load(sha) == data
    assert store.verify(sha) == path
    assert store.read_chunk(sha, 10, 20) == data[10:30]
    assert store.read_chunk(sha, 990, 100) == data[990:]
    assert store.usage().used_bytes == 1000


def test_store_put_twice_stores_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=10_000)
    data, sha = _blob(1)
    store.put(data)
    store.put(data, expected_sha256=sha)
    assert store.usage().blob_count == 1
    assert store.usage().used_bytes == 1000


def test_store_put_rejects_wrong_hash(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=10_000)
    data, _ = _blob(1)
    _, other = _blob(2)
    with pytest.raises(CorruptBlobError, match=f"expected blob {other}"):
        store.put(data, expected_sha256=other)
    assert store.usage().blob_count == 0
    assert list((tmp_path / "blobs").iterdir()) == []


def test_store_rejects_path_like_ids(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=10_000)
    with pytest.raises(ValueError, match="invalid blob id '../../etc/passwd'"):
        store.has("../../etc/passwd")
    with pytest.raises(BlobNotFoundError, match="not in the store"):
        store.path("0" * 64)


# --- quota, LRU, pins ---------------------------------------------------------------------------


def test_store_evicts_least_recently_used(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=3000)
    (a, sha_a), (b, sha_b), (c, sha_c), (d, sha_d) = (_blob(i) for i in range(4))
    for data in (a, b, c):
        store.put(data)
    store.path(sha_a)  # a is now more recent than b
    store.put(d)
    assert store.has(sha_a)
    assert not store.has(sha_b)
    assert store.has(sha_c)
    assert store.has(sha_d)
    assert store.usage().used_bytes == 3000


def test_store_never_evicts_pinned(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=3000)
    blobs = [_blob(i) for i in range(4)]
    for data, sha in blobs[:3]:
        store.put(data)
        store.pin(sha)
    with pytest.raises(StoreFullError, match="3000 bytes are pinned"):
        store.put(blobs[3][0])
    store.unpin(blobs[1][1])
    store.put(blobs[3][0])
    assert not store.has(blobs[1][1])
    assert all(store.has(sha) for _, sha in (blobs[0], blobs[2], blobs[3]))


def test_store_pins_are_counted(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=3000)
    data, sha = _blob(1)
    store.put(data)
    store.pin(sha)
    store.pin(sha)
    store.unpin(sha)
    assert store.pinned(sha)
    with pytest.raises(BlobStoreError, match="pinned by a loaded segment"):
        store.delete(sha)
    store.unpin(sha)
    store.delete(sha)
    assert not store.has(sha)


def test_store_rejects_blob_above_quota(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=500)
    with pytest.raises(StoreFullError, match="more than the whole store quota of 500"):
        store.put(_blob(1)[0])


def test_store_lru_survives_restart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=2000)
    (a, sha_a), (b, sha_b), (c, _) = (_blob(i) for i in range(3))
    store.put(a)
    store.put(b)
    os.utime(tmp_path / "blobs" / sha_b, (1000, 1000))
    os.utime(tmp_path / "blobs" / sha_a, (2000, 2000))
    (tmp_path / "blobs" / ".tmp-leftover").write_bytes(b"half")
    reopened = BlobStore(tmp_path, quota_bytes=2000)
    assert not (tmp_path / "blobs" / ".tmp-leftover").exists()
    reopened.put(c)
    assert reopened.has(sha_a)
    assert not reopened.has(sha_b)


# --- chunked transfers --------------------------------------------------------------------------


def test_store_resumes_after_restart(tmp_path: Path) -> None:
    data, sha = _blob(7, size=10_000)
    store = BlobStore(tmp_path, quota_bytes=100_000)
    assert store.partial_size(sha) == 0
    assert store.write_chunk(sha, 0, data[:4096]) == 4096
    assert store.write_chunk(sha, 4096, data[4096:6000]) == 6000

    reopened = BlobStore(tmp_path, quota_bytes=100_000)  # the agent restarted mid-transfer
    offset = reopened.partial_size(sha)
    assert offset == 6000
    with pytest.raises(ValueError, match="resume from offset 6000"):
        reopened.write_chunk(sha, 8000, data[8000:])
    # A resent chunk that overlaps what is stored overwrites it.
    reopened.write_chunk(sha, 4096, data[4096:8192])
    reopened.write_chunk(sha, 8192, data[8192:])
    path = reopened.finish(sha, expected_size=len(data))
    assert path.read_bytes() == data
    assert reopened.has(sha)
    assert reopened.partial_size(sha) == 0
    assert reopened.usage().partial_bytes == 0
    with pytest.raises(BlobStoreError, match="already complete"):
        reopened.write_chunk(sha, 0, data[:10])


def test_store_finish_short_transfer(tmp_path: Path) -> None:
    data, sha = _blob(3, size=2000)
    store = BlobStore(tmp_path, quota_bytes=100_000)
    store.write_chunk(sha, 0, data[:1500])
    with pytest.raises(BlobStoreError, match="resume the transfer from offset 1500"):
        store.finish(sha, expected_size=2000)
    assert store.partial_size(sha) == 1500


def test_store_finish_rejects_corrupt_transfer(tmp_path: Path) -> None:
    data, sha = _blob(3, size=2000)
    store = BlobStore(tmp_path, quota_bytes=100_000)
    store.write_chunk(sha, 0, data[:1000])
    store.write_chunk(sha, 1000, b"\x00" + data[1001:])
    with pytest.raises(CorruptBlobError, match="fetch it again"):
        store.finish(sha, expected_size=2000)
    assert not store.has(sha)
    assert store.partial_size(sha) == 0
    assert list((tmp_path / "partial").iterdir()) == []
    # The refetch from offset 0 succeeds.
    store.write_chunk(sha, 0, data)
    assert store.finish(sha, expected_size=2000).read_bytes() == data


def test_store_chunks_count_against_quota(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=2500)
    old, sha_old = _blob(1)
    store.put(old)
    data, sha = _blob(2, size=2000)
    store.write_chunk(sha, 0, data[:1000])
    store.write_chunk(sha, 1000, data[1000:])  # needs room: the old blob is evicted
    assert not store.has(sha_old)
    assert store.finish(sha, 2000).read_bytes() == data


def test_store_detects_corruption_on_load(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=10_000)
    data, sha = _blob(5)
    path = store.put(data)
    store.pin(sha)
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlobError, match="does not match its hash and was deleted"):
        store.load(sha)
    assert not store.has(sha)
    assert not path.exists()
    store.put(data)
    path.write_bytes(b"rot")
    with pytest.raises(CorruptBlobError):
        store.verify(sha)
    assert not store.has(sha)


# --- full disk ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 1 MiB tmpfs when mounting works (root), else os.write patched to fail past 1 MiB."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True).returncode
        == 0
    )
    if not mounted:
        # Fake only where a real small filesystem cannot be made (not root): the store's writes
        # then fail with ENOSPC after 1 MiB in total, like a full disk.
        real_write = os.write
        written = [0]

        def limited_write(fd: int, data: bytes | memoryview) -> int:
            if written[0] + len(data) > 1024 * 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            written[0] += len(data)
            return real_write(fd, data)

        monkeypatch.setattr(store_module.os, "write", limited_write)
    try:
        yield mount_point
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], check=True)


def test_store_full_disk_put(tiny_disk: Path) -> None:
    store = BlobStore(tiny_disk, quota_bytes=100 * 1024 * 1024)
    data, sha = _blob(9, size=2 * 1024 * 1024)
    with pytest.raises(StoreFullError, match=f"disk full while writing blob {sha}"):
        store.put(data)
    assert not store.has(sha)
    assert list((tiny_disk / "blobs").iterdir()) == []
    small, small_sha = _blob(10, size=1000)
    store.put(small)
    assert store.load(small_sha) == small


def test_store_full_disk_chunks(tiny_disk: Path) -> None:
    store = BlobStore(tiny_disk, quota_bytes=100 * 1024 * 1024)
    data, sha = _blob(11, size=2 * 1024 * 1024)
    chunk = 256 * 1024
    with pytest.raises(StoreFullError, match="disk full while writing blob"):
        for offset in range(0, len(data), chunk):
            store.write_chunk(sha, offset, data[offset : offset + chunk])
    kept = store.partial_size(sha)
    assert kept % chunk == 0
    assert (tiny_disk / "partial" / f"{sha}.part").stat().st_size == kept
    assert not store.has(sha)
    assert list((tiny_disk / "blobs").iterdir()) == []
