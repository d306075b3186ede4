"""Durable state of the election core and the epoch fence.

The election is only safe if the term, the vote and the registry entry survive a crash exactly
as they were when a message went out: a node that forgets its vote can vote twice in one term,
and a node that forgets its term can accept a deposed coordinator. Every write therefore goes
to a temporary file in the same directory, is fsynced, renamed over the old file and followed by
an fsync of the directory, so a reader sees either the old file or the new one, never half of
one. A file that exists but cannot be parsed is an error, never a fresh start, because starting
over at term 0 would undo the guarantee above.

`MemoryElectionStorage` keeps the same state in memory for simulations that restart nodes
without touching a disk.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Bumped when the layout of the stored JSON changes. A newer format is rejected with an error
# instead of being half-understood.
STATE_FORMAT_VERSION = 1


class ElectionStorageError(RuntimeError):
    """Raised when stored election or fencing state cannot be read or written."""


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One version of the replicated registry value.

    Entries are ordered by `(term, index)`: the term of the coordinator that wrote the entry
    first, then the index that coordinator gave it. Raft orders log positions the same way.
    """

    term: int
    index: int
    value: dict[str, Any]

    @property
    def position(self) -> tuple[int, int]:
        """The `(term, index)` pair used to compare entries."""
        return (self.term, self.index)


@dataclass(frozen=True, slots=True)
class PersistentState:
    """Election state that must survive restarts.

    `entry` is the newest registry entry this node has stored, committed or not. `committed` is
    the newest entry that this node has seen stored by a majority of voters.
    """

    term: int = 0
    voted_for: str | None = None
    entry: RegistryEntry | None = None
    committed: RegistryEntry | None = None


class ElectionStorage(Protocol):
    """Storage interface for the `PersistentState` of an `ElectionCore`.

    `save` must return only after the state is durable.
    """

    def load(self) -> PersistentState: ...

    def save(self, state: PersistentState) -> None: ...


@dataclass
class MemoryElectionStorage:
    """In-memory storage for simulations: state survives a simulated restart of the core."""

    state: PersistentState = field(default_factory=PersistentState)
    save_count: int = 0

    def load(self) -> PersistentState:
        return self.state

    def save(self, state: PersistentState) -> None:
        self.state = state
        self.save_count += 1


class FileElectionStorage:
    """`PersistentState` in one JSON file, replaced atomically on every save."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> PersistentState:
        raw = read_json_file(self.path)
        if raw is None:
            logger.info("no election state at %s, starting at term 0", self.path)
            return PersistentState()
        try:
            return _state_from_json(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ElectionStorageError(
                f"election state file {self.path} is invalid ({exc}); restore it from a backup "
                "or, if this node must rejoin as a fresh member, move it away after removing "
                "the node from the voter list"
            ) from exc

    def save(self, state: PersistentState) -> None:
        write_json_atomic(self.path, _state_to_json(state))


def _entry_to_json(entry: RegistryEntry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {"term": entry.term, "index": entry.index, "value": entry.value}


def _entry_from_json(raw: Any, field_name: str) -> RegistryEntry | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"field {field_name!r} must be an object, got {type(raw).__name__}")
    term = _non_negative_int(raw["term"], f"{field_name}.term")
    index = _non_negative_int(raw["index"], f"{field_name}.index")
    value = raw["value"]
    if not isinstance(value, dict):
        raise TypeError(f"field {field_name}.value must be an object, got {type(value).__name__}")
    return RegistryEntry(term=term, index=index, value=value)


def _state_to_json(state: PersistentState) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT_VERSION,
        "term": state.term,
        "voted_for": state.voted_for,
        "entry": _entry_to_json(state.entry),
        "committed": _entry_to_json(state.committed),
    }


def _state_from_json(raw: Any) -> PersistentState:
    if not isinstance(raw, dict):
        raise TypeError(f"top level must be an object, got {type(raw).__name__}")
    version = raw.get("format")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(
            f"format {version!r} is not supported (this build reads {STATE_FORMAT_VERSION})"
        )
    voted_for = raw["voted_for"]
    if voted_for is not None and not isinstance(voted_for, str):
        raise TypeError(f"field 'voted_for' must be a string or null, got {voted_for!r}")
    return PersistentState(
        term=_non_negative_int(raw["term"], "term"),
        voted_for=voted_for,
        entry=_entry_from_json(raw["entry"], "entry"),
        committed=_entry_from_json(raw["committed"], "committed"),
    )


def _non_negative_int(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"field {field_name!r} must be a non-negative integer, got {value!r}")
    return value


def read_json_file(path: Path) -> Any | None:
    """Return the parsed JSON in `path`, or None when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ElectionStorageError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ElectionStorageError(
            f"{path} is not valid JSON ({exc}); restore it from a backup before starting"
        ) from exc


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` so that a crash leaves the old or the new file, whole.

    Steps: write a temporary file in the same directory, fsync it, rename it over `path`, fsync
    the directory so the rename itself is durable.
    """
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    directory = path.parent
    tmp_path = directory / f".{path.name}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
        _fsync_directory(directory)
    except OSError as exc:
        raise ElectionStorageError(f"cannot write {path}: {exc}") from exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
