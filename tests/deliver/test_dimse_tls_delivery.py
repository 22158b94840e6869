"""C-STORE delivery over DICOM TLS to dcmtk ``storescp +tls`` (which asks
for a client certificate and verifies it against its ``+cf`` CA)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from peers import JobWithOutputs, StoreSCP  # noqa: F401 - tests/deliver/conftest.py
from pacs_node.db.models import DeliveryAttempt
from tlscerts import Pki, make_pki
from worker.deliver.service import deliver_job
from worker.deliver.settings import load_destinations


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_scp(storescp: Callable[..., StoreSCP], pki: Pki) -> StoreSCP:
    return storescp(args=["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca)])


def deliver(job: JobWithOutputs, scp: StoreSCP, **tls: Any) -> list[DeliveryAttempt]:
    dests = load_destinations([scp.destination("tls-scp", tls=True, max_attempts=3, **tls)], "PACSNODE")
    deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("no retry expected"))
    with job.db.session() as s:
        return list(s.execute(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job.job_id)).scalars())


def test_delivery_over_mutual_tls(job: JobWithOutputs, storescp: Callable[..., StoreSCP], pki: Pki) -> None:
    scp = tls_scp(storescp, pki)
    rows = deliver(job, scp, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    assert job.state() == "done"
    assert [(r.status, r.status_code) for r in rows] == [("success", 0)]
    assert {ds.SOPInstanceUID for ds in scp.received()} == job.sop_uids


@pytest.mark.parametrize(
    ("case", "tls", "expect"),
    [
        ("no client certificate", {}, "alert certificate required"),
        ("the archive's certificate from another CA", {"wrong_ca": True}, "CERTIFICATE_VERIFY_FAILED"),
        ("the archive's name not in its certificate", {"host": "127.0.0.2"}, "IP address mismatch"),
    ],
)
def test_tls_failures_are_permanent_and_say_why(
    job: JobWithOutputs, storescp: Callable[..., StoreSCP], pki: Pki, case: str, tls: dict[str, Any], expect: str
) -> None:
    scp = tls_scp(storescp, pki)
    keys: dict[str, Any] = {"tls_ca": str(pki.other_ca if tls.get("wrong_ca") else pki.ca)}
    if case != "no client certificate":
        keys.update(tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    if "host" in tls:
        keys["host"] = tls["host"]
    rows = deliver(job, scp, **keys)
    assert job.state() == "delivery_failed", case
    assert len(rows) == 1 and rows[0].status in ("error", "refused"), case
    assert expect in (rows[0].error or ""), rows[0].error
    assert scp.received() == []


def test_hostname_check_can_be_turned_off(job: JobWithOutputs, storescp: Callable[..., StoreSCP], pki: Pki) -> None:
    scp = tls_scp(storescp, pki)
    rows = deliver(job, scp, host="127.0.0.2", tls_verify_hostname=False, tls_ca=str(pki.ca),
                   tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    assert job.state() == "done" and rows[0].status == "success"


def test_tls_keys_are_validated(tmp_path: Any, pki: Pki) -> None:
    base = {"name": "d", "kind": "dimse", "host": "h", "ae_title": "A"}
    with pytest.raises(ValueError, match=r"destinations\[d\]\.tls_ca: Path does not point to a file"):
        load_destinations([{**base, "tls": True, "tls_ca": str(tmp_path / "nope.pem")}])
    with pytest.raises(ValueError, match="tls = false"):
        load_destinations([{**base, "tls_ca": str(pki.ca)}])
    with pytest.raises(ValueError, match="tls keys apply to dimse destinations"):
        load_destinations([{"name": "w", "kind": "stowrs", "url": "https://x", "tls": True}])
