"""The task queue seen from the node: Celery configuration shared with the
workers, and the dispatcher that enqueues tasks *by name* with a job id
(pacs_node never imports the worker code).

Broker:

* ``redis://...`` (production): Redis.
* ``embedded`` (default for ``serve``): kombu's SQLAlchemy transport on a
  SQLite file under the data directory, a real queue shared by the node and
  the worker processes of one host, with no server to run.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import kombu.transport.sqlalchemy as _sqla
from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from sqlalchemy import create_engine

from pacs_node.config import Settings

__all__ = [
    "DELIVER_TASK",
    "Dispatcher",
    "PROCESS_TASK",
    "CeleryDispatcher",
    "broker_url",
    "celery_config",
    "make_celery",
]

logger = logging.getLogger(__name__)

PROCESS_TASK = "pacs_node.process_job"
DELIVER_TASK = "pacs_node.deliver_job"


class _EmbeddedChannel(_sqla.Channel):
    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        return create_engine(conninfo.hostname, connect_args={"timeout": 30})


class EmbeddedTransport(_sqla.Transport):
    """kombu's SQLAlchemy transport on SQLite, polling every 0.1 s (the
    default 1 s would add up to a second to every hand-over)."""

    Channel = _EmbeddedChannel
    polling_interval = 0.1


TRANSPORT_ALIASES["pacsnode-embedded"] = "pacs_node.queue:EmbeddedTransport"


def broker_url(settings: Settings) -> str:
    """The broker URL, with ``embedded`` resolved to the SQLite queue file."""
    url = settings.queue.broker_url
    if url == "embedded":
        path = (settings.data_dir / "queue.sqlite").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"pacsnode-embedded+sqlite:///{path}"
    return url


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the node (producer) and the workers."""
    q = settings.queue
    url = broker_url(settings)
    conf: dict[str, Any] = {
        "broker_url": url,
        "result_backend": q.result_backend or None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": q.io_queue,
        "task_routes": {PROCESS_TASK: {"queue": q.gpu_queue}, DELIVER_TASK: {"queue": q.io_queue}},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }
    if url.startswith(("redis://", "rediss://")):
        # A task is redelivered if its worker vanished without acking; the
        # node's lease recovery usually requeues sooner (see JobSupervisor).
        conf["broker_transport_options"] = {"visibility_timeout": 3600, "socket_connect_timeout": 5}
        conf["broker_connection_max_retries"] = 3
    return conf


def make_celery(settings: Settings, name: str = "pacs_node") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


class Dispatcher(Protocol):
    def enqueue_process(self, job_id: int) -> None: ...

    def enqueue_delivery(self, job_id: int) -> None: ...


class CeleryDispatcher:
    """Sends tasks by name. Call only after the job row is committed.

    Raises
    ------
    kombu.exceptions.OperationalError
        When the broker cannot be reached (the job stays queued with
        ``enqueued_at`` NULL and the supervisor retries).
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or make_celery(settings)

    def enqueue_process(self, job_id: int) -> None:
        self.app.send_task(PROCESS_TASK, args=[job_id], queue=self.settings.queue.gpu_queue)
        logger.info("job %d enqueued on %s", job_id, self.settings.queue.gpu_queue)

    def enqueue_delivery(self, job_id: int) -> None:
        self.app.send_task(DELIVER_TASK, args=[job_id], queue=self.settings.queue.io_queue)
        logger.info("job %d delivery enqueued on %s", job_id, self.settings.queue.io_queue)

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue (for /metrics); -1 when unknown."""
        out: dict[str, int] = {}
        with self.app.connection_for_write() as conn:
            for name in (self.settings.queue.gpu_queue, self.settings.queue.io_queue):
                try:
                    with conn.channel() as ch:
                        out[name] = int(ch.queue_declare(queue=name, passive=True).message_count)
                except Exception:  # noqa: BLE001 - a queue that was never declared
                    out[name] = 0
        return out

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    def close(self) -> None:
        self.app.close()
