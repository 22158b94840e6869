"""Secondary-capture overlay: RGB pictures of the slices with findings.

For each source slice that holds part of the mask (at most
``overlay_max_images``, those with the largest anomaly area, kept in slice
order), an RGB Secondary Capture image (highdicom ``sc.SCImage``) shows the
slice in grey (the source's first window, else the 1st-99th percentile of the
series) with the outline of the anomaly mask drawn in ``overlay_color``. For
PACS viewers that show neither SEG nor SR. Each image references its source
image (Source Image Sequence) and says "NOT FOR CLINICAL USE" in Image
Comments and Derivation Description.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from . import NOT_FOR_CLINICAL_USE
from .settings import OutputSettings
from .source import SourceSeries
from .uids import UIDFactory

__all__ = ["build_overlay", "overlay_slices", "render_slice"]


def overlay_slices(mask: np.ndarray, max_images: int) -> list[int]:
    """Slices with mask voxels: the ``max_images`` largest by area, in slice order."""
    area = np.asarray(mask, dtype=bool).reshape(mask.shape[0], -1).sum(axis=1)
    nonempty = [int(z) for z in np.flatnonzero(area)]
    if len(nonempty) > max_images:
        nonempty = sorted(sorted(nonempty, key=lambda z: (-int(area[z]), z))[:max_images])
    return nonempty


def _window(source: SourceSeries, sample: list[int]) -> tuple[float, float]:
    ds = source.dataset_of(sample[0]) if sample else source.first
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    if wc is not None and ww is not None and not source.is_multiframe:
        c = float(wc[0]) if isinstance(wc, MultiValue) else float(wc)
        w = float(ww[0]) if isinstance(ww, MultiValue) else float(ww)
        if w > 1:
            return c - w / 2, c + w / 2
    values = np.concatenate([source.slice_pixels(z).ravel() for z in sample]) if sample else np.zeros(1)
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(max(hi, lo + 1e-3))


def render_slice(pixels: np.ndarray, mask: np.ndarray, window: tuple[float, float], color: tuple[int, int, int]) -> np.ndarray:
    """RGB uint8 picture of one slice with the mask outline drawn."""
    lo, hi = window
    grey = np.clip((pixels.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    m = np.asarray(mask, dtype=bool)
    outline = m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)
    rgb[outline] = np.asarray(color, dtype=np.uint8)
    return rgb


def build_overlay(
    source: SourceSeries,
    mask: np.ndarray,
    *,
    uids: UIDFactory,
    settings: OutputSettings,
) -> list[hd.sc.SCImage]:
    """One SC image per slice with findings (none when the mask is empty)."""
    source.check_shape(mask, "mask")
    mask = np.asarray(mask, dtype=bool)
    zs = overlay_slices(mask, settings.overlay_max_images)
    if not zs:
        return []
    window = _window(source, zs)
    images: list[hd.sc.SCImage] = []
    for number, z in enumerate(zs, start=1):
        ref = source.slices[z]
        ref_ds = source.dataset_of(z)
        rgb = render_slice(source.slice_pixels(z), mask[z], window, settings.overlay_color)
        img = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref_ds,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.series("overlay"),
            series_number=settings.overlay_series_number,
            sop_instance_uid=uids.instance("overlay", z),
            instance_number=number,
            manufacturer=settings.manufacturer,
            patient_orientation=_orientation(ref_ds, ref.frame_number),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=settings.overlay_series_description,
        )
        src = Dataset()
        src.ReferencedSOPClassUID = ref.sop_class_uid
        src.ReferencedSOPInstanceUID = ref.sop_instance_uid
        if ref.frame_number is not None:
            src.ReferencedFrameNumber = ref.frame_number
        img.SourceImageSequence = [src]
        img.ImageComments = f"Anomaly outline - {NOT_FOR_CLINICAL_USE}"
        img.DerivationDescription = f"Source slice with AI anomaly outline; {NOT_FOR_CLINICAL_USE}"
        img.BurnedInAnnotation = "NO"
        # General Series Laterality (Type 2C): the source's value, else empty.
        img.Laterality = ref_ds.get("Laterality", "")
        if settings.institution_name:
            img.InstitutionName = settings.institution_name
        images.append(img)
    return images


def _orientation(ds: Dataset, frame_number: int | None) -> tuple[str, str]:
    """Patient Orientation (row, column directions) from the slice's direction cosines."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None and frame_number is not None:
        for seq in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            groups = ds.get(seq)
            if not groups:
                continue
            item = groups[frame_number - 1] if seq.startswith("PerFrame") else groups[0]
            po = item.get("PlaneOrientationSequence")
            if po:
                iop = po[0].ImageOrientationPatient
                break
    if iop is None:
        return ("", "")
    v = [float(x) for x in iop]
    return (_letters(v[:3]), _letters(v[3:]))


def _letters(vec: list[float]) -> str:
    pos, neg = ("L", "P", "H"), ("R", "A", "F")
    order = np.argsort(-np.abs(vec))
    out = ""
    for i in order:
        if abs(vec[i]) > 1e-4 and len(out) < 3:
            out += pos[i] if vec[i] > 0 else neg[i]
    return out or "L"
