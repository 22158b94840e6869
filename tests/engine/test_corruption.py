"""Local training corruptions: inside the foreground, deterministic, all kinds used."""

from __future__ import annotations

import pytest
import torch

from worker.engine.corruption import LOCAL_KINDS, local_corruption, soft_region
from worker.engine.train import TrainConfig, corrupt


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    fg = ((yy - 16) ** 2 + (xx - 16) ** 2 < 11**2).expand(n, 32, 32).clone()
    x = (0.5 + 0.1 * torch.sin(xx / 3))[None, None].expand(n, 3, 32, 32) * fg[:, None]
    return x.contiguous(), fg


def test_soft_region_is_half_on_the_boundary_and_bounded() -> None:
    m = soft_region(32, 32, (16.0, 16.0), (6.0, 6.0), 0.0, torch.Generator().manual_seed(0))
    assert m.min() >= 0 and m.max() <= 1
    assert m[16, 16] == 1 and m[0, 0] == 0
    with pytest.raises(ValueError):
        soft_region(32, 32, (16.0, 16.0), (0.0, 6.0), 0.0, torch.Generator())


@pytest.mark.parametrize("kind", LOCAL_KINDS)
def test_each_kind_changes_only_the_foreground(kind: str) -> None:
    x, fg = _batch()
    out = local_corruption(x, fg, torch.Generator().manual_seed(1), prob=1.0, kinds=(kind,))
    diff = (out - x).abs()
    assert diff[:, :, ~fg[0]].max() == 0
    changed = (diff.amax(1) > 1e-3).float().mean(dim=(1, 2))
    assert (changed > 0.01).all(), changed  # every sample got a region
    assert (changed < 0.8).all(), changed  # and it is local


def test_texture_keeps_local_mean_roughly_and_adds_fine_detail() -> None:
    x, fg = _batch(1)
    x = torch.full_like(x, 0.5) * fg[:, None]
    out = local_corruption(x, fg, torch.Generator().manual_seed(2), prob=1.0, kinds=("texture",), max_regions=1)
    region = (out - x).abs()[0, 1] > 1e-3
    vals = out[0, 1][region]
    assert abs(float(vals.mean()) - 0.5) < 0.1
    assert float(vals.std()) > 0.02
    assert not torch.equal(out[0, 0], out[0, 2])  # texture differs per context slice


def test_corruption_is_deterministic_and_respects_prob() -> None:
    x, fg = _batch()
    a = local_corruption(x, fg, torch.Generator().manual_seed(5), prob=0.5)
    b = local_corruption(x, fg, torch.Generator().manual_seed(5), prob=0.5)
    assert torch.equal(a, b)
    assert torch.equal(local_corruption(x, fg, torch.Generator(), prob=0.0), x)
    with pytest.raises(ValueError, match="unknown local corruption"):
        local_corruption(x, fg, torch.Generator(), kinds=("swirl",))


def test_train_corrupt_combines_coarse_noise_and_local() -> None:
    x, fg = _batch()
    cfg = TrainConfig(noise_res=(4,), noise_std=0.0, local_prob=1.0)
    out = corrupt(x, fg, cfg, torch.Generator().manual_seed(0))
    assert (out - x).abs().max() > 0.01  # local corruption alone (no coarse noise)
    assert torch.equal(corrupt(x, fg, TrainConfig(noise_res=(4,), noise_std=0.0), torch.Generator()), x)
