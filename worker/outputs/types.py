"""What the builders need from the engine, as small protocols and dataclasses.

The builders never import :mod:`worker.engine`; anything with these
attributes works (``worker.engine.predictor.Prediction`` and
``worker.engine.postprocess.Finding`` do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset

__all__ = [
    "AlgorithmInfo",
    "BuiltOutput",
    "FindingLike",
    "OutputKind",
    "PredictionLike",
    "PredictorLike",
]

#: Output kinds, as stored in ``outputs.kind``.
OutputKind = str  # "seg" | "map" | "sr" | "overlay"


class FindingLike(Protocol):
    """One connected anomalous region (``worker.engine.postprocess.Finding``)."""

    @property
    def label(self) -> int: ...
    @property
    def volume_mm3(self) -> float: ...
    @property
    def centroid_patient(self) -> tuple[float, float, float]: ...
    @property
    def bbox_zyx(self) -> tuple[int, int, int, int, int, int]: ...
    @property
    def max_score(self) -> float: ...
    @property
    def mean_score(self) -> float: ...
    @property
    def voxel_count(self) -> int: ...


class PredictionLike(Protocol):
    """Result of the engine on one volume (``worker.engine.predictor.Prediction``).

    ``mask`` (bool) and ``anomaly_map`` (float 0..1) are shaped ``(z, y, x)``
    in the slice order of the :class:`~worker.outputs.source.SourceSeries`.
    """

    @property
    def mask(self) -> np.ndarray: ...
    @property
    def anomaly_map(self) -> np.ndarray: ...
    @property
    def findings(self) -> Sequence[FindingLike]: ...
    @property
    def study_score(self) -> float: ...
    @property
    def threshold(self) -> float: ...


class PredictorLike(Protocol):
    """Identity of a loaded model (``worker.engine.predictor.Predictor``)."""

    @property
    def model_name(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    @property
    def checksum(self) -> str: ...


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the algorithm that produced a result.

    Attributes
    ----------
    name, version:
        Algorithm name and version (the version goes into every derived UID).
    checksum:
        sha256 of the model weights.
    threshold:
        Calibrated threshold on the raw anomaly score.
    """

    name: str
    version: str
    checksum: str = ""
    threshold: float | None = None

    @classmethod
    def from_predictor(cls, predictor: PredictorLike, threshold: float | None = None) -> "AlgorithmInfo":
        return cls(
            name=str(predictor.model_name),
            version=str(predictor.model_version),
            checksum=str(predictor.checksum or ""),
            threshold=threshold,
        )

    def parameters(self) -> dict[str, str]:
        """Algorithm parameters recorded in SEG/SR algorithm identification."""
        out: dict[str, str] = {}
        if self.checksum:
            out["model_sha256"] = self.checksum
        if self.threshold is not None:
            out["threshold"] = f"{self.threshold:.6g}"
        return out


@dataclass
class BuiltOutput:
    """One DICOM object built for a job, not yet written.

    Attributes
    ----------
    kind:
        ``seg``, ``map``, ``sr`` or ``overlay``.
    dataset:
        The highdicom object (a :class:`pydicom.Dataset`).
    filename:
        File name inside the job's output directory (``seg.dcm``,
        ``overlay-0001.dcm`` ...).
    expected:
        Facts the validation gate checks after re-reading the file
        (e.g. ``{"mask_sum": 123}``).
    """

    kind: str
    dataset: Dataset
    filename: str
    expected: dict[str, Any] = field(default_factory=dict)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @property
    def transfer_syntax_uid(self) -> str:
        return str(self.dataset.file_meta.TransferSyntaxUID)
