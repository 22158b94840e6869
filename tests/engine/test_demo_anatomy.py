"""The shipped demo model on heads it never saw: a simple phantom and generated anatomy.

These run the real bundled checkpoint (``pacs_node/data/demo-model.pt``) on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.engine.volume import Volume

DEMO = Path(__file__).resolve().parents[2] / "pacs_node" / "data" / "demo-model.pt"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    from worker.engine.predictor import Predictor

    return Predictor.from_checkpoint(DEMO, device="cpu")


def bright_sphere_phantom(seed: int = 0) -> tuple[Volume, np.ndarray]:
    """128 x 128, 24 slices of 2 mm: scalp, skull, CSF, grey and white matter, two ventricles, and one
    bright sphere (radius 18 % of the field of view's half-width) at 1.5 x white-matter intensity."""
    rng = np.random.default_rng(seed)
    nz, n, px, dz = 24, 128, 1.8, 2.0
    z = (np.arange(nz) - (nz - 1) / 2) * dz
    y = (np.arange(n) - (n - 1) / 2) * px
    x = (np.arange(n) - (n - 1) / 2) * px
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    r = np.sqrt((xx / 72.0) ** 2 + (yy / 90.0) ** 2 + (zz / 70.0) ** 2)  # 1 at the scalp surface
    img = np.zeros(zz.shape, np.float32)
    depth = (1 - r) * 72.0  # mm below the surface, roughly
    img[depth > 0] = 0.8     # scalp
    img[depth > 4] = 0.08    # skull
    img[depth > 10] = 0.2    # CSF
    img[depth > 12] = 0.6    # grey matter
    img[depth > 16] = 1.0    # white matter
    for side in (-1, 1):
        v = ((xx - side * 9) / 6.0) ** 2 + ((yy + 5) / 24.0) ** 2 + (zz / 14.0) ** 2
        img[v < 1] = 0.2
    radius = 0.18 * n * px / 2
    c = (0.0, -20.0, 30.0)
    sphere = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < radius ** 2
    img[sphere] = 1.5
    sigma = 0.02
    a = img + rng.normal(0, sigma, img.shape)
    b = rng.normal(0, sigma, img.shape)
    arr = np.sqrt(a * a + b * b).astype(np.float32) * 1000
    origin = (float(x[0]), float(y[0]), float(z[0]))
    return Volume(arr, (dz, px, px), origin, np.eye(3), "MR"), sphere


def test_bright_sphere_phantom_is_found(demo) -> None:  # type: ignore[no-untyped-def]
    from worker.engine.metrics import binary_metrics

    vol, sphere = bright_sphere_phantom()
    pred = demo.predict(vol)
    dice = binary_metrics(pred.mask, sphere)["dice"]
    assert dice >= 0.5, (dice, [f.volume_mm3 for f in pred.findings])


def test_generated_normal_head_stays_quiet(demo) -> None:  # type: ignore[no-untyped-def]
    from worker.engine.anatomy import SubjectConfig, make_subject
    from worker.engine.headdemo import SEEDS

    cfg = SubjectConfig(inplane_spacing=(1.0, 1.2), partial_coverage=0.0)
    total_ml = []
    for i in range(2):
        s = make_subject(SEEDS["test_normal"] + i, cfg)
        pred = demo.predict(s.volume)
        total_ml.append(sum(f.volume_mm3 for f in pred.findings) / 1000.0)
        assert pred.domain["in_domain"], pred.domain["warnings"]
    assert max(total_ml) <= 2.0, total_ml


def test_brain_mask_of_the_demo_model(demo) -> None:  # type: ignore[no-untyped-def]
    from worker.engine.anatomy import SubjectConfig, make_subject
    from worker.engine.brainmask import mask_dice
    from worker.engine.headdemo import SEEDS

    s = make_subject(SEEDS["test_normal"] + 7, SubjectConfig(inplane_spacing=(1.0, 1.2), partial_coverage=0.0))
    assert mask_dice(demo.brain_mask(s.volume), s.brain) >= 0.93


def test_lesion_is_found_in_generated_anatomy(demo) -> None:  # type: ignore[no-untyped-def]
    from worker.engine.anatomy import SubjectConfig
    from worker.engine.headdemo import SEEDS
    from worker.engine.lesions import make_lesion_subject
    from worker.engine.metrics import binary_metrics

    s = make_lesion_subject(SEEDS["test"] + 3, SubjectConfig(inplane_spacing=(1.0, 1.2), partial_coverage=0.0),
                            contrast="flair", kinds={"tumour": 1.0}, n=(1, 1))
    pred = demo.predict(s.volume)
    assert binary_metrics(pred.mask, s.mask)["dice"] >= 0.5


def test_sagittal_and_cropped_series_read_like_the_axial_one(demo) -> None:  # type: ignore[no-untyped-def]
    """A 3D head stored as sagittal slices is read as the same axial head (exact reorientation), and a
    rectangular field of view keeps the brain mask (padded, not stretched)."""
    from worker.engine.anatomy import SubjectConfig
    from worker.engine.brainmask import mask_dice
    from worker.engine.headdemo import SEEDS
    from worker.engine.lesions import make_lesion_subject

    s = make_lesion_subject(SEEDS["test"] + 5, SubjectConfig(inplane_spacing=(1.6, 1.6), slice_thickness=(1.6, 1.6),
                                                            partial_coverage=0.0),
                            contrast="flair", kinds={"tumour": 1.0}, n=(1, 1))
    v = s.volume
    axial = demo.predict(v)
    # index x -> patient posterior, y -> inferior, z -> left: a sagittal series of the same voxels
    arr = np.ascontiguousarray(v.array.transpose(2, 0, 1)[:, ::-1, :])
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)
    origin = v.index_to_patient(np.array([v.shape[0] - 1, 0, 0], float))
    sag = Volume(arr, (v.spacing[2], v.spacing[0], v.spacing[1]), tuple(origin), direction, "MR")
    back = np.ascontiguousarray(demo.predict(sag).mask[:, ::-1, :].transpose(1, 2, 0))
    assert mask_dice(back, axial.mask) >= 0.99
    crop = Volume(v.array[:, 12:-12, :], v.spacing, tuple(v.index_to_patient(np.array([0, 12, 0], float))), np.eye(3), "MR")
    assert mask_dice(demo.brain_mask(crop), s.brain[:, 12:-12, :]) >= 0.95
