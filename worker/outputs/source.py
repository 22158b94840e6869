"""The source series of a result: its datasets, and which slice is which.

The engine's arrays are shaped ``(z, y, x)`` with ``z`` sorted by the position
of each slice along the slice normal (row × column direction cosines), ties
broken by Instance Number (``worker.engine.dicom_io``). :class:`SourceSeries`
holds the source datasets and the reference (SOP Instance UID, frame number)
of every ``z`` index:

* single-frame series: the datasets themselves are kept in ``z`` order, so
  highdicom's rule "frame ``i`` of the pixel array belongs to
  ``source_images[i]``" holds;
* one enhanced multi-frame object: highdicom expects the arrays in stored
  frame order; :meth:`SourceSeries.to_source_order` permutes them.

Pass the engine's slice references (``load_series_refs``) as ``order`` to make
the correspondence explicit; without it the same sort as the engine's is
applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .headers import HeaderFix, fix_headers

__all__ = ["SliceRef", "SourceError", "SourceSeries"]

class SourceError(ValueError):
    """The source datasets cannot be used to build outputs."""


class _RefLike(Protocol):
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def frame_number(self) -> int | None: ...


@dataclass(frozen=True)
class SliceRef:
    """Where slice ``z`` comes from.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid:
        The source instance.
    frame_number:
        1-based frame number in a multi-frame instance, ``None`` otherwise.
    dataset_index:
        Index into :attr:`SourceSeries.datasets`.
    position:
        Image Position (Patient) of the slice.
    """

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None
    dataset_index: int
    position: tuple[float, float, float]


def _floats(v: Any, n: int, what: str) -> np.ndarray:
    try:
        a = np.asarray([float(x) for x in v], np.float64)
    except (TypeError, ValueError):
        raise SourceError(f"invalid {what}") from None
    if a.size != n:
        raise SourceError(f"{what} must have {n} values")
    return a


def _item(ds: Any, name: str) -> Any:
    seq = ds.get(name) if ds is not None else None
    return seq[0] if seq else None


def _frame_geometry(ds: Dataset, frame_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(position, orientation) of a frame of an enhanced multi-frame object."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    frame = ds.PerFrameFunctionalGroupsSequence[frame_index]
    plane = _item(frame, "PlanePositionSequence") or _item(shared, "PlanePositionSequence")
    orient = _item(frame, "PlaneOrientationSequence") or _item(shared, "PlaneOrientationSequence")
    if plane is None or orient is None:
        raise SourceError("multi-frame source lacks plane position or orientation")
    return (
        _floats(plane.ImagePositionPatient, 3, "ImagePositionPatient"),
        _floats(orient.ImageOrientationPatient, 6, "ImageOrientationPatient"),
    )


class SourceSeries:
    """Source images of a result, with one :class:`SliceRef` per ``z`` index.

    Build with :meth:`from_datasets` or :meth:`from_files`.
    """

    def __init__(self, datasets: list[Dataset], slices: list[SliceRef]) -> None:
        if not datasets or not slices:
            raise SourceError("no source images")
        self.datasets = datasets
        self.slices = slices
        self.is_multiframe = "PerFrameFunctionalGroupsSequence" in datasets[0]
        first = datasets[0]
        self.rows = int(first.Rows)
        self.columns = int(first.Columns)
        self._files: dict[str, Path] = {}
        self._pixel_cache: tuple[str, np.ndarray] | None = None
        #: What :func:`~worker.outputs.headers.fix_headers` changed in the
        #: copies the outputs are built from (the source is never changed).
        self.header_fixes: list[HeaderFix] = []
        #: The data sets as received, by SOP Instance UID.
        self.originals: dict[str, Dataset] = {}
        self._repair = True

    # ------------------------------------------------------------------ build
    @classmethod
    def from_files(
        cls, paths: Iterable[str | Path], order: Sequence[_RefLike] | None = None, *, repair_headers: bool = True
    ) -> "SourceSeries":
        """Read the files' headers and sort them; see :meth:`from_datasets`.

        Pixel data is not kept in memory (SEG, map and SR need only the
        headers); :meth:`slice_pixels` reads it from the file when an overlay
        is drawn.
        """
        datasets = []
        files: dict[str, Path] = {}
        for p in paths:
            try:
                ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file
                raise SourceError(f"cannot read {Path(p).name}: {type(exc).__name__}") from None
            datasets.append(ds)
            files[str(ds.get("SOPInstanceUID", ""))] = Path(p)
        return cls.from_datasets(datasets, order, files=files, repair_headers=repair_headers)

    @classmethod
    def from_datasets(
        cls,
        datasets: Sequence[Dataset],
        order: Sequence[_RefLike] | None = None,
        *,
        files: Mapping[str, Path] | None = None,
        repair_headers: bool = True,
    ) -> "SourceSeries":
        """Sort the source images into volume slice order.

        Parameters
        ----------
        datasets:
            The series' instances, in any order: single-frame images, or
            exactly one enhanced multi-frame image.
        order:
            Optional references of the engine's slices in ``z`` order (objects
            with ``sop_instance_uid`` and ``frame_number``, e.g.
            ``worker.engine.dicom_io.FrameRef``). Without it, slices are sorted
            by their position along the slice normal, then Instance Number, as
            the engine does.
        files:
            SOP Instance UID -> file, for data sets read without their Pixel
            Data (:meth:`slice_pixels` reads the pixels from there).
        repair_headers:
            Repair invalid patient/study values in the copies the outputs are
            built from (:func:`~worker.outputs.headers.fix_headers`); False:
            only add missing Type 2 attributes. Either way the changes are in
            :attr:`header_fixes`.

        Raises
        ------
        SourceError
            Mixed series or sizes, missing geometry, more than one multi-frame
            object, two images at one position, or ``order`` naming unknown
            instances/frames.
        """
        if not datasets:
            raise SourceError("no source images")
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
        if len(series) != 1:
            raise SourceError(f"source images belong to {len(series)} series")
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
        if len(sizes) != 1:
            raise SourceError("source images have different sizes")
        multi = ["PerFrameFunctionalGroupsSequence" in ds for ds in datasets]
        if any(multi) and len(datasets) != 1:
            raise SourceError("a multi-frame source must be exactly one enhanced multi-frame instance")
        originals = {str(ds.get("SOPInstanceUID", "")): ds for ds in datasets}
        datasets, header_fixes = fix_headers(datasets, repair=repair_headers)

        # Every candidate slice: (dataset index, frame number, position, orientation, instance number)
        cands: list[tuple[int, int | None, np.ndarray, np.ndarray, int]] = []
        if multi[0]:
            ds = datasets[0]
            n = int(ds.get("NumberOfFrames", 1) or 1)
            if len(ds.PerFrameFunctionalGroupsSequence) != n:
                raise SourceError("number of per-frame functional groups differs from NumberOfFrames")
            for f in range(n):
                pos, iop = _frame_geometry(ds, f)
                cands.append((0, f + 1, pos, iop, f + 1))
        else:
            for i, ds in enumerate(datasets):
                if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                    raise SourceError("legacy multi-frame images without functional groups are not supported")
                for key in ("ImagePositionPatient", "ImageOrientationPatient"):
                    if key not in ds:
                        raise SourceError(f"source image lacks {key}")
                cands.append((
                    i,
                    None,
                    _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                    _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                    int(ds.get("InstanceNumber", 0) or 0),
                ))

        if order is not None:
            index = {(str(datasets[c[0]].SOPInstanceUID), c[1]): c for c in cands}
            try:
                ordered = [index[(str(r.sop_instance_uid), r.frame_number)] for r in order]
            except KeyError as exc:
                raise SourceError(f"slice order names an unknown instance/frame {exc.args[0]}") from None
            if len(set(map(id, ordered))) != len(ordered) or len(ordered) != len(cands):
                raise SourceError("slice order must name every source slice exactly once")
        else:
            iop = cands[0][3]
            normal = np.cross(iop[:3], iop[3:])
            if np.linalg.norm(normal) < 0.5:
                raise SourceError("degenerate ImageOrientationPatient")
            normal /= np.linalg.norm(normal)
            ordered = sorted(cands, key=lambda c: (round(float(c[2] @ normal), 4), c[4]))
        # Two images at one position are not one volume (highdicom would fail
        # with "Plane positions must not contain duplicates").
        positions = {tuple(np.round(c[2], 3)) for c in ordered}
        if len(positions) != len(ordered):
            raise SourceError(
                f"series {series.pop()} has {len(ordered)} images at {len(positions)} slice positions: "
                "several images share a position (echoes, phases or b-values in one series)"
            )

        if not multi[0]:
            # Keep single-frame datasets in z order (highdicom pairs frame i with source_images[i]).
            datasets = [datasets[c[0]] for c in ordered]
            ordered = [(z, None, c[2], c[3], c[4]) for z, c in enumerate(ordered)]
        slices = [
            SliceRef(
                sop_class_uid=str(datasets[c[0]].SOPClassUID),
                sop_instance_uid=str(datasets[c[0]].SOPInstanceUID),
                frame_number=c[1],
                dataset_index=c[0],
                position=(float(c[2][0]), float(c[2][1]), float(c[2][2])),
            )
            for c in ordered
        ]
        result = cls(datasets, slices)
        result._files = dict(files or {})
        result.header_fixes = header_fixes
        result.originals = originals
        result._repair = repair_headers
        return result

    def fix_flagged(self, keywords: Iterable[str]) -> list[HeaderFix]:
        """Also repair attributes an external check (dciodvfy) found invalid.

        Returns
        -------
        list[HeaderFix]
            The fixes added (also appended to :attr:`header_fixes`).
        """
        fixed, fixes = fix_headers(self.datasets, flagged=keywords, repair=self._repair)
        known = {(f.keyword, f.action) for f in self.header_fixes}
        new = [f for f in fixes if (f.keyword, f.action) not in known]
        self.datasets = fixed
        self.header_fixes = sorted([*self.header_fixes, *new], key=lambda f: (f.tag, f.action))
        return new

    def source_file(self, z: int = 0) -> Path | None:
        """The file of slice ``z``'s instance as received, when known."""
        return self._files.get(self.slices[z].sop_instance_uid)

    # ------------------------------------------------------------- properties
    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Expected ``(z, y, x)`` shape of masks and maps."""
        return (self.num_slices, self.rows, self.columns)

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def study_instance_uid(self) -> str:
        return str(self.first.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str | None:
        uid = self.first.get("FrameOfReferenceUID")
        return str(uid) if uid else None

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "OT"))

    # ------------------------------------------------------------- arrays
    def check_shape(self, array: np.ndarray, what: str) -> None:
        """Raise :class:`SourceError` unless ``array`` is shaped like the series."""
        if tuple(array.shape) != self.shape:
            raise SourceError(f"{what} has shape {tuple(array.shape)}, the source series is {self.shape}")

    def to_source_order(self, array: np.ndarray) -> np.ndarray:
        """Reorder a ``(z, ...)`` array into the frame order highdicom pairs with the sources.

        Identity for single-frame series; for a multi-frame source, row ``k``
        of the result belongs to frame ``k + 1``.
        """
        if not self.is_multiframe:
            return array
        out = np.empty_like(array)
        for z, ref in enumerate(self.slices):
            assert ref.frame_number is not None
            out[ref.frame_number - 1] = array[z]
        return out

    def slice_pixels(self, z: int) -> np.ndarray:
        """Pixel values (rescaled, float32) of slice ``z``."""
        ref = self.slices[z]
        ds = self.datasets[ref.dataset_index]
        pix = self._pixels(ds)
        if ref.frame_number is not None:
            pix = pix[ref.frame_number - 1] if pix.ndim == 3 else pix
            trans = None
            frames = ds.get("PerFrameFunctionalGroupsSequence")
            if frames:
                trans = _item(frames[ref.frame_number - 1], "PixelValueTransformationSequence")
            trans = trans or _item(_item(ds, "SharedFunctionalGroupsSequence"), "PixelValueTransformationSequence")
            slope = float(trans.get("RescaleSlope", 1) or 1) if trans is not None else 1.0
            inter = float(trans.get("RescaleIntercept", 0) or 0) if trans is not None else 0.0
        else:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            inter = float(ds.get("RescaleIntercept", 0) or 0)
        return np.asarray(pix, np.float32) * slope + inter

    def _pixels(self, ds: Dataset) -> np.ndarray:
        uid = str(ds.SOPInstanceUID)
        if self._pixel_cache is not None and self._pixel_cache[0] == uid:
            return self._pixel_cache[1]
        if "PixelData" in ds or uid not in self._files:
            pix = ds.pixel_array
        else:
            pix = pydicom.dcmread(str(self._files[uid])).pixel_array
        self._pixel_cache = (uid, pix)
        return pix

    def dataset_of(self, z: int) -> Dataset:
        return self.datasets[self.slices[z].dataset_index]
