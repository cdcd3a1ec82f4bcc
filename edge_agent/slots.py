"""Where an updating agent keeps its models: two slots, a current pointer, and the update state.

    models-{device}/
        slots/a/  slots/b/     two bundle directories (A/B)
        current -> slots/a     symlink to the bundle the agent runs
        previous -> ...        symlink to the bundle it ran before (a slot or the factory bundle)
        state.json             the update state (UpdateRecord)

Crash safety rests on three facts. A new bundle is only ever written into the slot `current`
does not point to. `current` changes by renaming a new symlink over it (rename(2) is atomic):
after a crash it names the old complete bundle or the new complete one, never a mix. The state
file is replaced the same way, after an fsync. Without a `current`, the agent runs the bundle
its settings name (the factory bundle, read-only).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet.contract.assignment import UpdateState

log = logging.getLogger(__name__)

SLOT_NAMES = ("a", "b")


@dataclass(slots=True)
class UpdateRecord:
    """The persisted update state."""

    state: str = UpdateState.IDLE.value
    target: str | None = None     # name@version being installed (or last refused/failed)
    target_digest: str | None = None  # sha256 of the target's canonical manifest
    seq: int = 0                  # the assignment being worked on
    max_seq: int = 0              # the newest assignment accepted
    highest: dict[str, int] = field(default_factory=dict)  # anti-rollback floor per name
    error: str | None = None
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpdateRecord:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class ModelSlots:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "slots").mkdir(parents=True, exist_ok=True)
        self._state_path = root / "state.json"

    # ------------------------------------------------------------------ pointers

    def _pointer(self, name: str) -> Path | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        return Path(os.readlink(link))

    def current(self) -> Path | None:
        return self._pointer("current")

    def previous(self) -> Path | None:
        return self._pointer("previous")

    def slot(self, name: str) -> Path:
        return self.root / "slots" / name

    def staging(self) -> Path:
        """The slot `current` does not point to: where the next bundle is written."""
        cur = self.current()
        for name in SLOT_NAMES:
            if cur is None or cur != self.slot(name):
                return self.slot(name)
        raise AssertionError("unreachable")

    def prepare_staging(self, keep: bool) -> Path:
        """The staging slot, emptied unless `keep` (resuming the same target's download).

        If `previous` points to it, that pointer goes first: a half-written slot is never
        anyone's fallback."""
        staging = self.staging()
        if self.previous() == staging:
            self._unlink("previous")
        if not keep and staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def activate(self, slot: Path, previous: Path) -> None:
        """Point `previous` at the bundle running now and `current` at `slot`, atomically each."""
        self._link("previous", previous)
        self._link("current", slot)

    def revert(self) -> Path | None:
        """Point `current` back at `previous`; returns it (None if there is no previous)."""
        prev = self.previous()
        if prev is None:
            self._unlink("current")
            return None
        self._link("current", prev)
        self._unlink("previous")
        return prev

    def _link(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, self.root / name)
        self._sync_dir()

    def _unlink(self, name: str) -> None:
        link = self.root / name
        if link.is_symlink():
            link.unlink()
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ state

    def load_state(self) -> UpdateRecord:
        try:
            d = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return UpdateRecord()
        except (OSError, ValueError) as exc:
            # The file is only ever replaced whole, so this is damage from outside: start
            # over, keeping the pointers (which alone decide what runs).
            log.error("update state %s unreadable (%s); starting from an empty state",
                      self._state_path, exc)
            return UpdateRecord()
        return UpdateRecord.from_dict(d) if isinstance(d, dict) else UpdateRecord()

    def save_state(self, record: UpdateRecord) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(record.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._state_path)
        self._sync_dir()
