"""Brain-mask network plumbing, the blob corruption, per-slice residual offsets and method keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.anatomy import SubjectConfig, make_subject
from worker.engine.brainmask import BrainMaskConfig, BrainMasker, brain_slices, mask_dice, train_brain_masker
from worker.engine.corruption import ALL_LOCAL_KINDS, LOCAL_KINDS, local_corruption
from worker.engine.model import UNetConfig
from worker.engine.scoring import ScoringConfig, method_variant, residual_map

SMALL = SubjectConfig(inplane_spacing=(1.8, 2.0), slice_thickness=(5.0, 6.0), partial_coverage=0.0)


def test_brain_masker_trains_and_travels_in_a_checkpoint() -> None:
    cfg = BrainMaskConfig(size=(48, 48), arch=UNetConfig(in_channels=1, depth=3, base=4).to_dict())
    subjects = [make_subject(40_000 + i, SMALL) for i in range(2)]
    x, y = brain_slices([s.volume for s in subjects], [s.brain for s in subjects], cfg)
    assert x.shape[1:] == (1, 48, 48) and y.shape == x.shape and 0 < float(y.mean()) < 1
    masker = train_brain_masker(x, y, cfg, steps=30, batch_size=8, seed=0, log_every=0)
    meta_entry, tensors = masker.to_parts()
    assert all(k.startswith("brainnet.") for k in tensors)
    again = BrainMasker.from_checkpoint_parts({"brain_mask": meta_entry}, tensors)
    assert again is not None
    vol = subjects[0].volume
    np.testing.assert_array_equal(masker.probability(vol)[0], again.probability(vol)[0])
    assert BrainMasker.from_checkpoint_parts({}, {}) is None
    bad = {k: torch.zeros(1) for k in tensors}
    with pytest.raises(ValueError, match="do not match"):
        BrainMasker.from_checkpoint_parts({"brain_mask": meta_entry}, bad)


def test_mask_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert mask_dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert mask_dice(a, b) == pytest.approx(0.5)


def test_brain_region_model_needs_a_brain_masker(tiny_ckpt) -> None:  # type: ignore[no-untyped-def]
    from worker.engine.checkpoint import load_checkpoint
    from worker.engine.model import UNet
    from worker.engine.predictor import Predictor

    ck = load_checkpoint(tiny_ckpt)
    meta = dict(ck.meta)
    meta["preprocess"] = {**meta["preprocess"], "region": "brain"}
    model = UNet(UNetConfig.from_dict(meta["arch"]))
    with pytest.raises(ValueError, match="no brain-mask network"):
        Predictor(model, meta, ck.tensors, device="cpu")


def test_blob_corruption_replaces_the_region_with_one_level() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((4, 3, 32, 32)) * 0.2 + 0.5
    fg = torch.ones((4, 32, 32), dtype=torch.bool)
    out = local_corruption(x, fg, gen, prob=1.0, kinds=("blob",), radius=(0.2, 0.3))
    changed = (out - x).abs() > 1e-4
    assert changed.any()
    assert "blob" in ALL_LOCAL_KINDS and "blob" not in LOCAL_KINDS  # phantom models keep their corruptions
    with pytest.raises(ValueError, match="unknown local corruption"):
        local_corruption(x, fg, gen, prob=1.0, kinds=("smudge",))


def test_slice_offset_removes_slice_wide_shifts_only() -> None:
    x = np.zeros((2, 20, 20), np.float32)
    recon = x.copy()
    recon[1] += 0.3  # the network "corrects" a whole slice
    recon[0, 5:8, 5:8] += 0.5  # and replaces a small lesion
    region = np.ones(x.shape, bool)
    plain = residual_map(x, recon)
    off = residual_map(x, recon, offset_region=region)
    assert plain[1].min() == pytest.approx(0.3) and off[1].max() == pytest.approx(0.0)
    assert off[0, 6, 6] == pytest.approx(0.5) and off[0, 0, 0] == 0.0


def test_method_keys() -> None:
    cfg = ScoringConfig(method="residual", combine_weight=0.5)
    assert method_variant(cfg, "combined").method == "combined" and method_variant(cfg, "combined").combine_weight == 0.5
    v = method_variant(cfg, "combined@2")
    assert v.method == "combined" and v.combine_weight == 2.0
    with pytest.raises(ValueError):
        method_variant(cfg, "combined@x")
