"""``/metrics``: Prometheus text exposition, computed from SQL at scrape time.

Every value comes from the database (or the broker), so the numbers are the
same whichever node process is scraped and survive restarts:

* ``pacs_node_instances_received_total``: counter, sum of ``instances.receive_count``.
* ``pacs_node_jobs{state}``: gauge, jobs per state (every state, 0 included).
* ``pacs_node_stage_duration_seconds{stage}``: histogram of the per-stage
  durations recorded in ``jobs.timings`` (``queue_wait``, ``load``,
  ``inference``, ``postprocess``, ``build``, ``delivery``...).
* ``pacs_node_queue_depth{queue}``: gauge, messages waiting in each broker
  queue; left out when the broker cannot be reached.
* ``pacs_node_delivery_attempts_total{status}``: counter, delivery attempts per status.
* ``pacs_node_storage_commitments{state}``: gauge, storage commitment requests
  per state (``pending``, ``committed``, ``failed``, ``timeout``,
  ``not_supported``, ``error``; every state, 0 included).
* ``pacs_node_broker_up``: gauge, 1 when the broker answered the scrape.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from pacs_node.api.auth import Require
from pacs_node.api.deps import dispatcher_of
from pacs_node.db.models import DeliveryAttempt, Instance, Job, StorageCommitment
from pacs_node.jobs.states import JobState
from pacs_node.node import Node

__all__ = ["BUCKETS", "NodeCollector", "histogram_buckets", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])

#: The classic text format that ``generate_latest`` writes (understood by
#: every Prometheus version).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: States of a storage commitment request (``storage_commitments.state``).
COMMITMENT_STATES: tuple[str, ...] = ("pending", "committed", "failed", "timeout", "not_supported", "error")

#: Upper bounds (seconds) of the stage duration histogram buckets.
BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def histogram_buckets(values: list[float], bounds: tuple[float, ...] = BUCKETS) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` buckets of ``values``, ending with ``+Inf``.

    Parameters
    ----------
    values:
        Observations.
    bounds:
        Sorted finite upper bounds.

    Returns
    -------
    list of (str, float)
        Bucket label and cumulative count.
    """
    ordered = sorted(values)
    out = [(_le(b), float(bisect.bisect_right(ordered, b))) for b in bounds]
    out.append(("+Inf", float(len(ordered))))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


def _stage_values(rows: list[Mapping[str, Any] | None]) -> dict[str, list[float]]:
    stages: dict[str, list[float]] = {}
    for timings in rows:
        if not isinstance(timings, Mapping):
            continue
        for stage, value in timings.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            v = float(value)
            if math.isfinite(v) and v >= 0:
                stages.setdefault(str(stage), []).append(v)
    return stages


class NodeCollector(Collector):
    """Yields the node's metric families from SQL and the broker.

    Parameters
    ----------
    node:
        The node (its database).
    dispatcher:
        Returns the dispatcher (``queue_depths()`` and ``ping()`` are used
        when present).
    """

    def __init__(self, node: Node, dispatcher: Callable[[], object]) -> None:
        self.node = node
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        """Query and yield every family (called once per scrape).

        Yields
        ------
        Metric
            The metric families described in the module docstring.
        """
        with self.node.db.sessionmaker() as s:
            received = s.execute(select(func.coalesce(func.sum(Instance.receive_count), 0))).scalar_one()
            by_state = {
                str(state): int(n)
                for state, n in s.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
            }
            timings = list(s.execute(select(Job.timings)).scalars())
            deliveries = {
                str(status): int(n)
                for status, n in s.execute(
                    select(DeliveryAttempt.status, func.count(DeliveryAttempt.id)).group_by(DeliveryAttempt.status)
                ).all()
            }
            commitments = {
                str(state): int(n)
                for state, n in s.execute(
                    select(StorageCommitment.state, func.count(StorageCommitment.id)).group_by(StorageCommitment.state)
                ).all()
            }

        c = CounterMetricFamily(
            "pacs_node_instances_received", "DICOM instances received (including re-sends)"
        )
        c.add_metric([], float(received))
        yield c

        g = GaugeMetricFamily("pacs_node_jobs", "Jobs per state", labels=["state"])
        known = [x.value for x in JobState]
        for name in known:
            g.add_metric([name], float(by_state.get(name, 0)))
        for name, n in sorted(by_state.items()):
            if name not in known:
                g.add_metric([name], float(n))
        yield g

        h = HistogramMetricFamily(
            "pacs_node_stage_duration_seconds", "Duration of each processing stage of the jobs", labels=["stage"]
        )
        for stage, values in sorted(_stage_values(timings).items()):
            h.add_metric([stage], histogram_buckets(values), sum_value=float(sum(values)))
        yield h

        d = CounterMetricFamily(
            "pacs_node_delivery_attempts", "Delivery attempts per status", labels=["status"]
        )
        for status, n in sorted(deliveries.items()):
            d.add_metric([status], float(n))
        yield d

        sc = GaugeMetricFamily(
            "pacs_node_storage_commitments", "Storage commitment requests after delivery, per state", labels=["state"]
        )
        for state in COMMITMENT_STATES:
            sc.add_metric([state], float(commitments.get(state, 0)))
        for state, n in sorted(commitments.items()):
            if state not in COMMITMENT_STATES:
                sc.add_metric([state], float(n))
        yield sc

        yield from self._queue_metrics()

    def _queue_metrics(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pacs_node_broker_up", "1 when the task broker answered this scrape")
        depth = GaugeMetricFamily("pacs_node_queue_depth", "Tasks waiting in each broker queue", labels=["queue"])
        dispatcher = self.dispatcher()
        depths_of = getattr(dispatcher, "queue_depths", None)
        if depths_of is None:
            yield depth
            return
        try:
            ping = getattr(dispatcher, "ping", None)
            if ping is not None:
                ping()
            depths: dict[str, int] = depths_of()
        except Exception as exc:  # noqa: BLE001 - broker down: the depth is unknown
            logger.debug("queue depths unavailable: %s", exc.__class__.__name__)
            up.add_metric([], 0.0)
            yield up
            yield depth
            return
        up.add_metric([], 1.0)
        for queue, n in sorted(depths.items()):
            depth.add_metric([queue], float(n) if n >= 0 else math.nan)
        yield up
        yield depth


@router.get(
    "/metrics",
    # A token with the scope of http.metrics_access ("read" by default), or none when "open".
    dependencies=[Depends(Require(setting="metrics_access"))],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
)
def metrics(request: Request) -> Response:
    """Prometheus text exposition of the node's metrics.

    Parameters
    ----------
    request:
        The current request.

    Returns
    -------
    Response
        ``text/plain; version=0.0.4``.
    """
    registry: CollectorRegistry | None = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        state = request.app.state
        registry.register(NodeCollector(state.node, lambda: dispatcher_of(state)))
        request.app.state.metrics_registry = registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
