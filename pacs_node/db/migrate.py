"""Run the Alembic migrations programmatically (``pacs-node db upgrade``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from pacs_node.db.session import Database

__all__ = ["alembic_config", "current_revision", "head_revision", "upgrade"]

logger = logging.getLogger(__name__)


def _script_location() -> Path:
    env = os.environ.get("PACS_NODE_ALEMBIC_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "alembic", Path.cwd() / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(
        "alembic/ migrations not found; install the project with `pip install -e .` "
        "or set PACS_NODE_ALEMBIC_DIR"
    )


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the project's migrations and ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_script_location()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> None:
    """Upgrade the database schema to ``revision``."""
    cfg = alembic_config(db.url.render_as_string(hide_password=False))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    logger.info("database schema at %s", current_revision(db))
