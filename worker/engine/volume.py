"""The :class:`Volume` container: a 3D image with its patient-space geometry."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["Volume"]


@dataclass
class Volume:
    """A 3D image on a regular grid in patient space.

    Parameters
    ----------
    array:
        Voxel values, float32, shaped ``(z, y, x)``.
    spacing:
        Voxel size in mm, ordered ``(z, y, x)``.
    origin:
        Patient-space position ``(x, y, z)`` of the centre of voxel ``[0, 0, 0]``.
    direction:
        3x3 matrix whose columns are the patient-space unit vectors of the
        x, y and z index axes (the ITK convention).
    modality:
        DICOM modality (``"MR"``, ``"CT"`` ...).
    meta:
        Free-form non-identifying strings (for example ``series_uid``).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str = "MR"
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (z, y, x), got shape {arr.shape}")
        self.array = arr.astype(np.float32, copy=False)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers, got {self.spacing}")
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(self.array.shape)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return float(np.prod(self.spacing))

    def index_to_patient(self, zyx: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Map (possibly fractional) voxel indices to patient coordinates.

        Parameters
        ----------
        zyx:
            Index ``(z, y, x)`` or an array shaped ``(..., 3)`` of such indices.

        Returns
        -------
        numpy.ndarray
            Patient coordinates ``(x, y, z)`` in mm, shaped like the input.
        """
        idx = np.asarray(zyx, dtype=np.float64)
        ijk = idx[..., ::-1] * np.asarray(self.spacing[::-1])  # (x, y, z) scaled to mm
        return np.asarray(self.origin) + ijk @ self.direction.T

    def with_array(self, array: np.ndarray) -> "Volume":
        """Return a copy on the same grid holding ``array``."""
        return replace(self, array=array, direction=self.direction.copy(), meta=dict(self.meta))

    def to_sitk(self) -> "object":
        """Convert to a ``SimpleITK.Image`` (same geometry)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(d) for d in self.direction.reshape(-1)))
        return img

    @classmethod
    def from_sitk(cls, img: Any, modality: str = "MR") -> "Volume":
        """Build a volume from a ``SimpleITK.Image``."""
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        return cls(
            array=arr,
            spacing=tuple(img.GetSpacing()[::-1]),
            origin=tuple(img.GetOrigin()),
            direction=np.asarray(img.GetDirection()).reshape(3, 3),
            modality=modality,
        )
