"""``pacs-node worker``: start a Celery worker for the gpu and/or io queues.

Run one worker per GPU (``CUDA_VISIBLE_DEVICES=N pacs-node worker --queues gpu``);
the io queue (delivery) can run anywhere that reaches the destinations and the
outputs directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import warnings

from celery.exceptions import SecurityWarning

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a worker for the gpu/io queues")
    p.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS, help="TOML configuration file")
    p.add_argument("--queues", "-Q", default="gpu,io", help="comma-separated queues (default: gpu,io)")
    p.add_argument("--concurrency", type=int, default=None, help="worker processes (default: queue.worker_concurrency)")
    p.add_argument("--name", default=None, help="worker node name (default: pacs-node-<queues>@<host>-<pid>)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from pacs_node.cli.common import load
    from pacs_node.queue import broker_url

    settings = load(args)
    config = getattr(args, "config", None)
    if config:
        # Pool processes load the same configuration.
        os.environ["PACS_NODE_CONFIG"] = os.path.abspath(config)
    from worker.engine.train import set_threads
    from worker.settings import WorkerSettings
    from worker.tasks import create_app

    try:
        WorkerSettings.from_settings(settings)
    except ValueError as exc:
        print(f"pacs-node: invalid configuration: {exc}".splitlines()[0])
        return 2
    set_threads(settings.engine.get("num_threads") or None)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    names = {"gpu": settings.queue.gpu_queue, "io": settings.queue.io_queue}
    resolved = ",".join(names.get(q, q) for q in queues)
    app = create_app(settings)
    name = args.name or f"pacs-node-{'-'.join(queues)}@{socket.gethostname()}-{os.getpid()}"
    url = broker_url(settings)
    logger.info("worker %s consuming %s from %s", name, resolved, url.split("@")[-1])
    # The node's log is the one place to read: no banner (--quiet), no
    # colours, and Celery's superuser warning (a Python warning printed to
    # stderr in the middle of the log) becomes one line of ours.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        logger.warning("worker %s runs as root; run it as an unprivileged user (deploy/systemd does)", name)
    argv = [
        "--quiet", "--no-color",
        "worker",
        "--queues", resolved,
        "--concurrency", str(args.concurrency or settings.queue.worker_concurrency),
        "--pool", "prefork",
        "--hostname", name,
        "--loglevel", settings.logging.level,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    app.worker_main(argv=argv)
    return 0
