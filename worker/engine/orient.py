"""Exact reorientation to the nearest axial (LPS) grid and back.

The models see axial slices. A sagittal or coronal acquisition (a 3D T1 is
often sagittal) is permuted and flipped — no interpolation — so that the
index axes x, y, z point as close as possible to the patient's left,
posterior and superior; results are mapped back with the inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume

__all__ = ["Orientation", "to_axial"]


@dataclass(frozen=True)
class Orientation:
    """How an array on the original grid maps to the axial one.

    Attributes
    ----------
    perm:
        For each new index axis (x, y, z in ITK order) the original one.
    flip:
        Whether each new axis runs against the original one.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        """True when nothing moves."""
        return self.perm == (0, 1, 2) and not any(self.flip)

    def forward(self, a: np.ndarray) -> np.ndarray:
        """Array ``(z, y, x)`` on the original grid → on the axial grid."""
        if self.identity:
            return a
        xyz = a.transpose(2, 1, 0).transpose(self.perm)
        for ax, f in enumerate(self.flip):
            if f:
                xyz = np.flip(xyz, ax)
        return np.ascontiguousarray(xyz.transpose(2, 1, 0))

    def back(self, a: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`forward`."""
        if self.identity:
            return a
        xyz = a.transpose(2, 1, 0)
        for ax, f in enumerate(self.flip):
            if f:
                xyz = np.flip(xyz, ax)
        inv = tuple(int(i) for i in np.argsort(self.perm))
        return np.ascontiguousarray(xyz.transpose(inv).transpose(2, 1, 0))


def to_axial(vol: Volume) -> tuple[Volume, Orientation]:
    """The volume on its nearest axial LPS grid, and the mapping.

    Returns
    -------
    tuple
        ``(axial_volume, orientation)``; ``orientation.back`` maps arrays on
        the axial grid to ``vol``'s grid exactly.
    """
    d = np.asarray(vol.direction, np.float64)
    perm = [-1, -1, -1]
    free = [0, 1, 2]
    # assign index axes to patient axes by decreasing alignment
    pairs = sorted(((abs(d[p, i]), p, i) for p in range(3) for i in range(3)), reverse=True)
    for _, p, i in pairs:
        if perm[p] == -1 and i in free:
            perm[p] = i
            free.remove(i)
    flip = tuple(bool(d[p, perm[p]] < 0) for p in range(3))
    o = Orientation(perm=(perm[0], perm[1], perm[2]), flip=flip)  # type: ignore[arg-type]
    if o.identity:
        return vol, o
    n_xyz = vol.shape[::-1]
    sp_xyz = vol.spacing[::-1]
    start = [0, 0, 0]  # original (x, y, z) index of the new first voxel
    for p in range(3):
        if flip[p]:
            start[perm[p]] = n_xyz[perm[p]] - 1
    origin = vol.index_to_patient(np.array(start[::-1], np.float64))
    new_dir = np.stack([d[:, perm[p]] * (-1.0 if flip[p] else 1.0) for p in range(3)], axis=1)
    new_sp_xyz = [sp_xyz[perm[p]] for p in range(3)]
    sp = (float(new_sp_xyz[2]), float(new_sp_xyz[1]), float(new_sp_xyz[0]))
    org = (float(origin[0]), float(origin[1]), float(origin[2]))
    out = Volume(o.forward(vol.array), sp, org, new_dir, vol.modality, dict(vol.meta))
    return out, o
