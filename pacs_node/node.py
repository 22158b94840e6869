"""Composition root: build the node's parts from one validated Settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pacs_node.config import Settings
from pacs_node.db.migrate import current_revision, head_revision, upgrade
from pacs_node.db.session import Database
from pacs_node.ingest.reconcile import ReconcileReport
from pacs_node.ingest.recorder import Ingestor
from pacs_node.ingest.storage import InstanceStore

__all__ = ["Node", "SchemaOutdatedError"]

logger = logging.getLogger(__name__)


class SchemaOutdatedError(RuntimeError):
    """The database schema is not at the code's migration head."""


@dataclass
class Node:
    settings: Settings
    db: Database
    store: InstanceStore
    ingestor: Ingestor
    #: The last storage reconciliation (start-up, :mod:`pacs_node.ingest.reconcile`).
    reconcile: ReconcileReport | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, migrate: bool | None = None) -> "Node":
        """Connect the database and storage.

        Parameters
        ----------
        settings:
            Validated settings.
        migrate:
            Upgrade the schema first. ``None``: upgrade an embedded SQLite
            database when ``database.auto_upgrade`` is set; a server database
            is upgraded by ``pacs-node db upgrade`` (an operator's step).

        Raises
        ------
        SchemaOutdatedError
            When the schema is not at the migration head and was not upgraded.
        """
        db = Database(settings.database.url, echo=settings.database.echo)
        if migrate is None:
            migrate = db.is_sqlite and settings.database.auto_upgrade
        if migrate:
            upgrade(db)
        current, head = current_revision(db), head_revision()
        if current != head:
            db.dispose()
            raise SchemaOutdatedError(
                f"database schema is at {current or 'nothing'}, code expects {head}: run `pacs-node db upgrade`"
            )
        store = InstanceStore(
            settings.storage.root, fsync=settings.storage.fsync, min_free_bytes=settings.storage.min_free_bytes
        )
        return cls(settings=settings, db=db, store=store, ingestor=Ingestor(db, store, settings.ingest))

    def close(self) -> None:
        self.db.dispose()
