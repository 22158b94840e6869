"""[[destinations]] validation, backoff, and deliver_job driven by node Settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from peers import JobWithOutputs, StoreSCP
from nodetest import make_settings
from worker.deliver.base import DeliveryResult, InstanceStatus
from worker.deliver.service import deliver_job
from worker.deliver.settings import DestinationSettings, load_destinations


def test_defaults_and_calling_aet() -> None:
    (d,) = load_destinations([{"name": "pacs", "kind": "dimse", "host": "pacs", "ae_title": "PACS"}], "MYNODE")
    assert (d.port, d.calling_ae_title, d.timeout, d.max_attempts, d.backoff_seconds, d.max_backoff_seconds) == (
        104, "MYNODE", 30.0, 5, 2.0, 300.0)
    (w,) = load_destinations([{"name": "web", "kind": "stowrs", "url": "https://x.example/dicom-web/"}])
    assert w.url == "https://x.example/dicom-web" and w.headers == {} and w.token == ""
    assert [d.backoff(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    capped = DestinationSettings(name="c", kind="dimse", host="h", ae_title="A", backoff_seconds=10, max_backoff_seconds=25)
    assert [capped.backoff(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 25.0, 25.0]


@pytest.mark.parametrize("table,message", [
    ({"name": "a", "kind": "dimse", "ae_title": "X"}, "host"),
    ({"name": "a", "kind": "dimse", "host": "h"}, "ae_title"),
    ({"name": "a", "kind": "stowrs"}, "url"),
    ({"name": "a", "kind": "ftp", "host": "h"}, "kind"),
    ({"name": "a b", "kind": "stowrs", "url": "http://x"}, "name"),
    ({"name": "a", "kind": "stowrs", "url": "http://x", "colour": 1}, "unknown key"),
    ({"name": "a", "kind": "dimse", "host": "h", "ae_title": "X" * 17}, "ae_title"),
    ({"name": "a", "kind": "stowrs", "url": "http://x", "max_attempts": 0}, "max_attempts"),
])
def test_invalid_tables(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_destinations([table])


def test_duplicate_names() -> None:
    t = {"name": "a", "kind": "stowrs", "url": "http://x"}
    with pytest.raises(ValueError, match="duplicate"):
        load_destinations([t, t])


def test_result_status_rules() -> None:
    ok = InstanceStatus("1", "c", "success", 0)
    refused = InstanceStatus("2", "c", "refused", 0xA900)
    busy = InstanceStatus("3", "c", "error", 0xA700, transient=True)
    assert DeliveryResult([ok]).status == "success"
    assert DeliveryResult([ok, refused]).status == "partial" and not DeliveryResult([ok, refused]).retryable
    assert DeliveryResult([ok, busy]).retryable
    assert DeliveryResult([refused]).status == "refused"
    assert DeliveryResult(error="down", transient=True).status == "error"
    assert DeliveryResult(error="rejected", transient=False).status == "refused"


def test_deliver_job_from_node_settings(job: JobWithOutputs, storescp: Callable[..., StoreSCP], tmp_path: Path) -> None:
    """The worker pipeline's call: destinations and calling AE title come from the node settings."""
    scp = storescp()
    settings = make_settings(tmp_path, "sqlite:///:memory:", dicom__ae_title="NODE1")
    settings.destinations = [scp.destination(name="pacs")]
    state = deliver_job(job.db, job.job_id, settings=settings, outputs_dir=job.outputs_dir)
    assert str(state) == "done"
    assert {ds.SOPInstanceUID for ds in scp.received()} == job.sop_uids
