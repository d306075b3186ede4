"""Epoch fencing: an agent obeys only the newest coordinator it has heard of.

Election alone cannot stop a deposed coordinator from acting. A process that was paused (a long
GC, a stopped VM, a machine on the far side of a healed partition) can wake up still believing it
leads and send commands before it learns that a newer term exists. The fix, known as a fencing
token, is to let the receiver decide: every coordinator command carries the coordinator's epoch,
which is its election term, and each agent remembers the highest epoch it has accepted and
rejects anything older.

Rules of `EpochFence.check(epoch, coordinator_id)`:
- an epoch older than the highest accepted one raises `StaleEpochError`;
- the highest accepted epoch with a different coordinator id raises `EpochConflictError`, because
  the election guarantees one coordinator per term, so a second one means misconfiguration
  (for example two static coordinators) and must not be obeyed;
- a newer epoch is written to storage before `check` returns, so a restart cannot forget it.

`raise_floor(epoch)` records a term learned from the election itself (a vote request or a heartbeat
of a newer term) so commands from an older coordinator are rejected even before the new one has
sent anything.

The coordinator id passed to `check` must be the node id from the sender's TLS certificate, never
a field of the command: a message field can be forged by any peer with a valid certificate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator.election_storage import ElectionStorageError, read_json_file, write_json_atomic

logger = logging.getLogger(__name__)

FENCE_FORMAT_VERSION = 1


class FencingError(Exception):
    """Base class for rejected coordinator commands."""


class InvalidEpochError(FencingError, ValueError):
    """Raised for an epoch that is not a non-negative integer."""


class StaleEpochError(FencingError):
    """Raised for a command whose epoch is older than the highest this agent accepted."""

    def __init__(self, epoch: int, highest: int, coordinator_id: str) -> None:
        self.epoch = epoch
        self.highest = highest
        self.coordinator_id = coordinator_id
        super().__init__(
            f"rejected command from coordinator {coordinator_id!r}: epoch {epoch} is older than "
            f"the highest accepted epoch {highest}; that coordinator has been replaced and must "
            "step down"
        )


class EpochConflictError(FencingError):
    """Raised when two different coordinators claim the same epoch."""

    def __init__(self, epoch: int, coordinator_id: str, accepted_id: str) -> None:
        self.epoch = epoch
        self.coordinator_id = coordinator_id
        self.accepted_id = accepted_id
        super().__init__(
            f"rejected command from coordinator {coordinator_id!r}: epoch {epoch} already belongs "
            f"to coordinator {accepted_id!r}; check that only one static coordinator is "
            "configured and that no node's election state was copied from another"
        )


@dataclass(frozen=True, slots=True)
class FenceState:
    """The highest accepted epoch and the coordinator that held it (None if learned by vote)."""

    epoch: int = 0
    coordinator_id: str | None = None


class FenceStorage(Protocol):
    def load(self) -> FenceState: ...

    def save(self, state: FenceState) -> None: ...


@dataclass
class MemoryFenceStorage:
    """In-memory fence storage for simulations."""

    state: FenceState = field(default_factory=FenceState)

    def load(self) -> FenceState:
        return self.state

    def save(self, state: FenceState) -> None:
        self.state = state


class FileFenceStorage:
    """`FenceState` in one JSON file, replaced atomically (temp file, fsync, rename)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> FenceState:
        raw = read_json_file(self.path)
        if raw is None:
            return FenceState()
        try:
            return _fence_from_json(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ElectionStorageError(
                f"fence state file {self.path} is invalid ({exc}); restore it from a backup"
            ) from exc

    def save(self, state: FenceState) -> None:
        write_json_atomic(
            self.path,
            {
                "format": FENCE_FORMAT_VERSION,
                "epoch": state.epoch,
                "coordinator_id": state.coordinator_id,
            },
        )


def _fence_from_json(raw: Any) -> FenceState:
    if not isinstance(raw, dict):
        raise TypeError(f"top level must be an object, got {type(raw).__name__}")
    if raw.get("format") != FENCE_FORMAT_VERSION:
        raise ValueError(f"format {raw.get('format')!r} is not supported")
    epoch = raw["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"field 'epoch' must be a non-negative integer, got {epoch!r}")
    coordinator_id = raw["coordinator_id"]
    if coordinator_id is not None and not isinstance(coordinator_id, str):
        raise TypeError(f"field 'coordinator_id' must be a string or null, got {coordinator_id!r}")
    return FenceState(epoch=epoch, coordinator_id=coordinator_id)


class EpochFence:
    """The highest coordinator epoch this agent accepted, persisted through `storage`."""

    def __init__(self, storage: FenceStorage, *, node_id: str = "") -> None:
        self._storage = storage
        self._node_id = node_id
        self._state = storage.load()

    @property
    def highest_epoch(self) -> int:
        return self._state.epoch

    @property
    def coordinator_id(self) -> str | None:
        """The coordinator of the highest accepted epoch, once it has sent a command."""
        return self._state.coordinator_id

    def check(self, epoch: int, coordinator_id: str) -> None:
        """Accept a command of `epoch` from `coordinator_id` or raise a `FencingError`.

        `coordinator_id` must come from the sender's TLS certificate. Raises `StaleEpochError`,
        `EpochConflictError` or `InvalidEpochError`.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidEpochError(
                f"rejected command from coordinator {coordinator_id!r}: invalid epoch {epoch!r}, "
                "expected a non-negative integer"
            )
        current = self._state
        if epoch < current.epoch:
            logger.warning(
                "node %s rejected command from %s: epoch %d < accepted epoch %d",
                self._node_id, coordinator_id, epoch, current.epoch,
            )
            raise StaleEpochError(epoch, current.epoch, coordinator_id)
        if epoch == current.epoch:
            if current.coordinator_id is None:
                self._store(FenceState(epoch, coordinator_id))
            elif current.coordinator_id != coordinator_id:
                logger.error(
                    "node %s rejected command from %s: epoch %d belongs to %s",
                    self._node_id, coordinator_id, epoch, current.coordinator_id,
                )
                raise EpochConflictError(epoch, coordinator_id, current.coordinator_id)
            return
        logger.info(
            "node %s accepted coordinator %s at epoch %d (was %d)",
            self._node_id, coordinator_id, epoch, current.epoch,
        )
        self._store(FenceState(epoch, coordinator_id))

    def raise_floor(self, epoch: int) -> None:
        """Reject commands older than `epoch` from now on, without naming its coordinator."""
        if epoch > self._state.epoch:
            self._store(FenceState(epoch, None))

    def _store(self, state: FenceState) -> None:
        self._storage.save(state)
        self._state = state
