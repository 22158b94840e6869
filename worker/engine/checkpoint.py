"""Single-file checkpoints: weights + metadata, loaded safely.

Layout (a plain ``dict`` saved with :func:`torch.save`, loadable with
``weights_only=True``)::

    {"format": "pacs-node-anomaly", "format_version": 1,
     "meta": "<JSON string>", "weights_sha256": "<hex>",
     "state_dict": {name: tensor}, "tensors": {name: tensor}}

``meta`` holds the architecture, preprocessing, scoring (threshold and how it
was calibrated), training-data description and hash, validation metrics and
code version. ``tensors`` holds extra arrays (baseline statistics).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "Checkpoint", "FORMAT", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint",
           "file_sha256", "tensors_sha256"]

log = logging.getLogger(__name__)

FORMAT = "pacs-node-anomaly"
FORMAT_VERSION = 1
_REQUIRED_META = ("model_name", "arch", "preprocess", "scoring", "code_version")


class CheckpointError(RuntimeError):
    """The checkpoint is missing, corrupted, or incompatible with this code."""


@dataclass
class Checkpoint:
    """Loaded checkpoint content."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sha256: str = ""


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(*dicts: dict[str, torch.Tensor]) -> str:
    """Content hash of tensors (names, dtypes, shapes and bytes), order-independent."""
    h = hashlib.sha256()
    for d in dicts:
        for k in sorted(d):
            t = d[k].detach().cpu().contiguous().reshape(-1)
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                    tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Write a checkpoint atomically (temporary file + rename).

    Parameters
    ----------
    path:
        Destination file.
    state_dict:
        Model weights.
    meta:
        JSON-serialisable metadata; must contain the keys in ``_REQUIRED_META``.
    tensors:
        Extra named tensors.

    Returns
    -------
    str
        sha256 of the written file.

    Raises
    ------
    CheckpointError
        When metadata is incomplete or not JSON-serialisable.
    """
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {exc}") from None
    sd = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}
    tx = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in (tensors or {}).items()}
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta_json,
        "weights_sha256": tensors_sha256(sd, tx),
        "state_dict": sd,
        "tensors": tx,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return file_sha256(path)


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify a checkpoint without executing pickled code.

    Parameters
    ----------
    path:
        Checkpoint file.

    Returns
    -------
    Checkpoint
        Verified content.

    Raises
    ------
    CheckpointError
        When the file is missing, unreadable, truncated or tampered with, of an
        unknown format or version, or lacks required metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    try:
        blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unusable
        raise CheckpointError(f"checkpoint {path.name} is corrupted or not a pacs-node model: {type(exc).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path.name} is not a pacs-node anomaly model")
    if blob.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path.name} has format version {blob.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    try:
        meta = json.loads(blob["meta"])
        sd, tx = blob["state_dict"], blob.get("tensors", {})
        ok = tensors_sha256(sd, tx) == blob["weights_sha256"]
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path.name} is malformed: {type(exc).__name__}") from None
    if not ok:
        raise CheckpointError(f"checkpoint {path.name} failed its integrity check (weights hash mismatch)")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path.name} lacks metadata: {', '.join(missing)}")
    return Checkpoint(state_dict=sd, meta=meta, tensors=tx, sha256=hashlib.sha256(raw).hexdigest())
