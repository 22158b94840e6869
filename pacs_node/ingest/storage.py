"""Durable instance storage: ``<root>/<Study>/<Series>/<SOP>.dcm``.

Files are written atomically (temporary file in the target directory, fsync,
rename, fsync of the directory), so a file either exists complete or not at
all, and once :meth:`InstanceStore.write` returns the bytes survive a crash.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pacs_node.ingest.uids import check_uid

__all__ = ["InstanceStore", "StorageFullError", "StoredFile"]

logger = logging.getLogger(__name__)


class StorageFullError(OSError):
    """Not enough free space (or quota) to store an instance."""


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sha256: str


class InstanceStore:
    """Writes and locates instance files under one root directory.

    Parameters
    ----------
    root:
        Storage root; created if missing.
    fsync:
        fsync files and directories (the durability rule; only tests of
        unrelated behaviour turn it off).
    min_free_bytes:
        Refuse writes that would leave less free space than this.
    """

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self._known_dirs: set[Path] = set()

    def relpath_for(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Relative path of an instance; every UID is checked first.

        Raises
        ------
        InvalidUIDError
            When a UID does not follow the UID grammar.
        """
        parts = (
            check_uid(study_uid, "StudyInstanceUID"),
            check_uid(series_uid, "SeriesInstanceUID"),
            check_uid(sop_uid, "SOPInstanceUID") + ".dcm",
        )
        return "/".join(parts)

    def path_of(self, relpath: str) -> Path:
        """Absolute path of a stored file; refuses anything outside the root."""
        p = (self.root / relpath).resolve()
        if not p.is_relative_to(self.root):
            raise ValueError(f"path {relpath!r} is outside the storage root")
        return p

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes | memoryview) -> StoredFile:
        """Write one instance durably and return where it went.

        Raises
        ------
        InvalidUIDError
            A UID is not valid (nothing is written).
        StorageFullError
            Not enough free space, or the disk/quota is full.
        OSError
            Any other storage failure.
        """
        rel = self.relpath_for(study_uid, series_uid, sop_uid)
        target = self.path_of(rel)
        size = len(data)
        if self.min_free_bytes and self.free_bytes() - size < self.min_free_bytes:
            raise StorageFullError(errno.ENOSPC, "free space below storage.min_free_bytes")
        directory = target.parent
        self._ensure_dir(directory)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
            if self.fsync:
                self._fsync_dir(directory)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(exc.errno, str(exc)) from exc
            raise
        return StoredFile(relpath=rel, size=size, sha256=hashlib.sha256(data).hexdigest())

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs and directory.is_dir():
            return
        created: list[Path] = []
        p = directory
        while not p.exists():
            created.append(p)
            p = p.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            # New directory entries must be durable too: fsync each new
            # directory's parent, deepest first.
            for d in created:
                self._fsync_dir(d.parent)
        self._known_dirs.add(directory)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
