"""Delivery of a job's outputs to the configured ``[[destinations]]``.

* :mod:`.settings` — ``DestinationSettings`` (one ``[[destinations]]`` table);
* :mod:`.base` — the :class:`~.base.Deliverer` interface and the registry of
  implementations by ``kind``;
* :mod:`.dimse` — C-STORE SCU (pynetdicom);
* :mod:`.stowrs` — STOW-RS (httpx);
* :mod:`.service` — :func:`~.service.deliver_job`: every destination, retries
  with exponential backoff, one ``delivery_attempts`` row per attempt, and the
  job's final state.
"""

from __future__ import annotations

__all__: list[str] = []
