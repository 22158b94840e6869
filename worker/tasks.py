"""Celery tasks of the worker. Thin: they take a job id and call
:mod:`worker.pipeline`; state lives in SQL.

* ``pacs_node.process_job`` (queue ``gpu``): fetch, infer, build outputs.
* ``pacs_node.deliver_job`` (queue ``io``): send outputs to the destinations.

Both are ``acks_late`` with ``reject_on_worker_lost`` (a task whose worker
died is redelivered), retry only :class:`~worker.pipeline.TransientJobError`,
and are idempotent (the SQL claim makes a re-run of a finished step a no-op).
The model is loaded once per worker process (cached in the context).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from pacs_node.config import Settings, load_settings
from pacs_node.queue import DELIVER_TASK, PROCESS_TASK, make_celery
from worker import pipeline

__all__ = ["create_app", "get_context"]

logger = logging.getLogger(__name__)

MAX_RETRIES = 5
_context: pipeline.WorkerContext | None = None
_context_pid: int | None = None


def get_context(settings: Settings | None = None) -> pipeline.WorkerContext:
    """The per-process worker context (database, dispatcher, model cache)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = pipeline.WorkerContext.create(settings or load_settings(os.environ.get("PACS_NODE_CONFIG")))
        _context_pid = os.getpid()
    return _context


def _retry_or_fail(task: Task, job_id: int, exc: Exception) -> Any:
    if task.request.retries >= MAX_RETRIES:
        ctx = get_context()
        pipeline._fail(ctx, job_id, f"gave up after {MAX_RETRIES} retries: {exc}")
        return "failed"
    raise task.retry(exc=exc, countdown=min(60, 2 ** task.request.retries))


def create_app(settings: Settings) -> Celery:
    """The worker's Celery app with both tasks registered."""
    app = make_celery(settings, name="pacs_node_worker")
    q = settings.queue

    @app.task(name=PROCESS_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=MAX_RETRIES, soft_time_limit=q.task_soft_time_limit, time_limit=q.task_time_limit)
    def process_job(self: Task, job_id: int) -> str:
        try:
            return pipeline.process(get_context(settings), int(job_id))
        except pipeline.TransientJobError as exc:
            return str(_retry_or_fail(self, job_id, exc))
        except SoftTimeLimitExceeded:
            pipeline._fail(get_context(settings), job_id, f"time limit of {q.task_soft_time_limit:g} s exceeded")
            return "failed"

    @app.task(name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=MAX_RETRIES, soft_time_limit=q.task_soft_time_limit, time_limit=q.task_time_limit)
    def deliver_job(self: Task, job_id: int) -> str:
        return pipeline.deliver(get_context(settings), int(job_id))

    return app
