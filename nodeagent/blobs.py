"""Segment blob transfer between agents: chunked, resumable and verified by hash.

A model is read from disk once, by the coordinator that exports it; every other agent fetches the
blobs of the segments it runs from any peer that holds them, over the data plane. A transfer asks
for ``CHUNK_BYTES`` at a time, resumes from the bytes already on disk after a broken link or a
restart (the store keeps partial files), and the store verifies the sha256 before a blob becomes
visible. A corrupt blob is deleted and fetched again from the next holder. A blob that is already
in the store moves no bytes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from nodeagent.store import BlobStoreError, CorruptBlobError
from protocol.messages import MsgType

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024
"""Bytes per BLOB_CHUNK frame: large enough to reach link speed, small enough that a data-plane
frame of an activation waits at most a few milliseconds behind one chunk."""

CHUNK_TIMEOUT_S = 20.0


class BlobUnavailable(RuntimeError):
    """No reachable peer could supply a blob."""


class BlobTransfer:
    """Fetches blobs from peers into the local store and serves local blobs to peers."""

    def __init__(self, *, node_id: str, store, links) -> None:
        self.node_id = node_id
        self.store = store
        self.links = links
        self._pending: dict[str, asyncio.Future] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self.bytes_fetched = 0
        self.bytes_served = 0

    async def fetch(self, sha: str, holders: Iterable[str], *, progress: Callable[[int, int], None] | None = None) -> Path:
        """Return the local path of blob ``sha``, fetching it from ``holders`` if needed.

        Concurrent calls for one blob share a single transfer.
        """
        if self.store.has(sha):
            return self.store.path(sha)
        running = self._inflight.get(sha)
        if running is not None:
            return await asyncio.shield(running)
        future = asyncio.get_running_loop().create_future()
        self._inflight[sha] = future
        try:
            path = await self._fetch_any(sha, list(holders), progress)
            future.set_result(path)
            return path
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved when no one else waits on it
            raise
        finally:
            self._inflight.pop(sha, None)

    async def _fetch_any(self, sha: str, holders: list[str], progress) -> Path:
        errors: list[str] = []
        for holder in holders:
            if holder == self.node_id or not self.links.connected(holder, "data"):
                continue
            try:
                return await self._fetch_from(holder, sha, progress)
            except (BlobUnavailable, ConnectionError, asyncio.TimeoutError, ValueError) as exc:
                errors.append(f"{holder}: {exc}")
                logger.info("blob fetch from peer failed node=%s peer=%s blob=%s: %s", self.node_id, holder, sha[:12], exc)
        raise BlobUnavailable(
            f"blob {sha[:12]} is not available from any connected peer "
            f"({'; '.join(errors) or 'no connected holder'})"
        )

    async def _fetch_from(self, peer: str, sha: str, progress) -> Path:
        offset = self.store.partial_size(sha)
        total: int | None = None
        while total is None or offset < total:
            request_id = uuid.uuid4().hex[:12]
            future = asyncio.get_running_loop().create_future()
            self._pending[request_id] = future
            try:
                await self.links.send(peer, MsgType.BLOB_REQUEST,
                                      {"req": request_id, "sha": sha, "offset": offset, "length": CHUNK_BYTES},
                                      plane="data")
                header, data = await asyncio.wait_for(future, CHUNK_TIMEOUT_S)
            finally:
                self._pending.pop(request_id, None)
            if header.get("error"):
                raise BlobUnavailable(str(header["error"]))
            total = int(header["total"])
            if int(header["offset"]) != offset:
                raise ValueError(f"peer sent offset {header['offset']}, expected {offset}")
            if not data and offset < total:
                raise ValueError(f"peer sent an empty chunk at offset {offset} of {total}")
            await asyncio.to_thread(self.store.write_chunk, sha, offset, data)
            offset += len(data)
            self.bytes_fetched += len(data)
            if progress is not None:
                progress(offset, total)
        try:
            return await asyncio.to_thread(self.store.finish, sha, total)
        except CorruptBlobError as exc:
            logger.warning("blob failed verification and was deleted node=%s peer=%s blob=%s; trying the next holder",
                           self.node_id, peer, sha[:12])
            raise BlobUnavailable(str(exc)) from exc

    # ----------------------------------------------------------------- frames

    def on_request(self, peer: str, header: dict) -> None:
        sha = str(header.get("sha", ""))
        request_id = header.get("req")
        offset = int(header.get("offset", 0))
        length = min(int(header.get("length", CHUNK_BYTES)), CHUNK_BYTES)
        reply = {"req": request_id, "sha": sha, "offset": offset}
        buffers: tuple = ()
        if not self.store.has(sha):
            reply["error"] = f"agent {self.node_id} does not hold blob {sha[:12]}"
        else:
            try:
                total = self.store.size(sha)
                data = self.store.read_chunk(sha, offset, length)
                reply["total"] = total
                buffers = (data,)
                self.bytes_served += len(data)
            except (OSError, BlobStoreError) as exc:
                reply["error"] = f"reading blob {sha[:12]} failed on agent {self.node_id}: {exc}"
        self.links.send_nowait(peer, MsgType.BLOB_CHUNK, reply, buffers, plane="data")

    def on_chunk(self, peer: str, header: dict, payload) -> None:
        future = self._pending.get(header.get("req"))
        if future is None or future.done():
            return
        future.set_result((header, bytes(payload)))
