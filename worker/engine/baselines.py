"""Baseline statistics: the per-pixel normal atlas for the z-score baseline.

The score functions themselves live in :mod:`worker.engine.scoring`
(:func:`~worker.engine.scoring.intensity_outlier`,
:func:`~worker.engine.scoring.pixel_zscore`) so the U-Net and the baselines
share one code path for smoothing, calibration and post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ZScoreAtlas", "resample_z"]


def resample_z(image: np.ndarray, n: int) -> np.ndarray:
    """Linearly resample ``(z, H, W)`` to ``n`` slices by relative position."""
    z = image.shape[0]
    if z == n:
        return image.astype(np.float32, copy=True)
    pos = np.linspace(0, z - 1, n)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, z - 1)
    w = (pos - lo)[:, None, None]
    return ((1 - w) * image[lo] + w * image[hi]).astype(np.float32)


@dataclass
class ZScoreAtlas:
    """Per-pixel mean/std of normal images on the model grid.

    Slices are matched by relative position along z, which assumes the
    normal studies cover a comparable range of anatomy.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, images: list[np.ndarray], n_slices: int = 32) -> "ZScoreAtlas":
        """Estimate from normalised model-grid images ``(z, H, W)``.

        Raises
        ------
        ValueError
            When fewer than two images are given or in-plane sizes differ.
        """
        if len(images) < 2:
            raise ValueError("the z-score atlas needs at least two normal volumes")
        stack = np.stack([resample_z(im, n_slices) for im in images])
        return cls(mean=stack.mean(0).astype(np.float32), std=stack.std(0).astype(np.float32))

    def lookup(self, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std resampled to ``n_slices``."""
        return resample_z(self.mean, n_slices), resample_z(self.std, n_slices)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for the checkpoint."""
        return {"zscore_mean": torch.from_numpy(self.mean), "zscore_std": torch.from_numpy(self.std)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "ZScoreAtlas | None":
        """Inverse of :meth:`to_tensors` (``None`` when absent)."""
        if "zscore_mean" not in t:
            return None
        return cls(mean=t["zscore_mean"].numpy(), std=t["zscore_std"].numpy())
