"""Alembic is the only way the schema is made: the migrations run on SQLite and
PostgreSQL, and autogenerate finds no difference from the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from pacs_node.db.migrate import alembic_config, current_revision, head_revision, upgrade
from pacs_node.db.models import Base
from pacs_node.db.session import Database


def test_migrations_match_models(db_url: str) -> None:
    db = Database(db_url)
    try:
        upgrade(db)
        assert current_revision(db) == head_revision()
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        insp = inspect(db.engine)
        assert {"studies", "series", "instances", "jobs", "job_events"} <= set(insp.get_table_names())
        assert "job_status" in insp.get_view_names()
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM job_status")).scalar_one() == 0
    finally:
        db.dispose()


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    from alembic import command

    db = Database(db_url)
    try:
        upgrade(db)
        cfg = alembic_config(db.url.render_as_string(hide_password=False))
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert "jobs" not in inspect(db.engine).get_table_names()
        upgrade(db)
        assert current_revision(db) == head_revision()
    finally:
        db.dispose()
