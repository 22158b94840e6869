"""Tiny training runs: the loss goes down, runs are deterministic, resume works."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.engine.model import UNet, UNetConfig
from worker.engine.preprocess import PreprocessConfig
from worker.engine.synthetic import make_case
from worker.engine.train import TrainConfig, build_slices, corrupt, train, validate

SHAPE, SPACING = (10, 32, 32), (8.0, 6.0, 6.0)
PCFG = PreprocessConfig(size=(32, 32), context=1)
UCFG = UNetConfig(in_channels=3, depth=3, base=8)


def _data(seeds: range):
    return build_slices([make_case(s, False, shape=SHAPE, spacing=SPACING).volume for s in seeds], PCFG, 0.05)


def test_unet_shapes_and_depth() -> None:
    for norm in ("group", "instance"):
        m = UNet(UNetConfig(in_channels=5, depth=4, base=8, norm=norm))
        assert m(torch.zeros(2, 5, 32, 48)).shape == (2, 1, 32, 48)
        assert len(m.enc) == 4 and len(m.dec) == 3


def test_corruption_is_coarse_and_inside_foreground() -> None:
    x = torch.zeros(4, 3, 32, 32)
    fg = torch.zeros(4, 32, 32, dtype=torch.bool)
    fg[:, 8:24, 8:24] = True
    out = corrupt(x, fg, TrainConfig(noise_res=(4,), noise_std=0.2), torch.Generator().manual_seed(0))
    assert out[:, :, ~fg[0]].abs().max() == 0
    assert out[:, :, fg[0]].abs().max() > 0.05
    torch.testing.assert_close(out[:, 0], out[:, 2])  # same field on every channel
    inner = out[0, 0, 8:24, 8:24]
    assert (inner[1:] - inner[:-1]).abs().mean() < 0.25 * inner.abs().mean()  # low frequency


def test_training_lowers_loss_and_is_deterministic(tmp_path: Path) -> None:
    tr, va = _data(range(4)), _data(range(100, 101))
    cfg = TrainConfig(epochs=2, steps_per_epoch=6, batch_size=8, warmup_steps=2, seed=3, noise_res=(4, 8))
    torch.manual_seed(3)
    before = validate(UNet(UCFG), va, cfg, torch.device("cpu"))
    r1 = train(tr, va, UCFG, cfg, device="cpu", progress=False)
    assert r1.best_val_loss < 0.7 * before
    assert r1.history[-1]["train_loss"] < 0.7 * before
    r2 = train(tr, va, UCFG, cfg, device="cpu", progress=False)
    for (k, a), b in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_every_epoch_and_resume(tmp_path: Path) -> None:
    import pytest

    tr, va = _data(range(3)), _data(range(100, 101))
    cfg = TrainConfig(epochs=2, steps_per_epoch=3, batch_size=4, warmup_steps=1, seed=1, noise_res=(4,), patience=10)
    state = tmp_path / "m.pt.state"
    full = train(tr, va, UCFG, cfg, device="cpu", progress=False)
    one = train(tr, va, UCFG, cfg, device="cpu", state_path=state, progress=False, max_epochs_this_run=1)
    assert one.epochs_run == 1 and one.stopped == "interrupted" and state.exists()
    assert torch.load(state, weights_only=True)["epoch"] == 1
    other = TrainConfig(**{**cfg.to_dict(), "lr": 1e-4})
    with pytest.raises(ValueError, match="different configuration"):
        train(tr, va, UCFG, other, device="cpu", state_path=state, resume=True, progress=False)
    resumed = train(tr, va, UCFG, cfg, device="cpu", state_path=state, resume=True, progress=False)
    assert resumed.epochs_run == 2 and len(resumed.history) == 2
    assert resumed.history[1]["val_loss"] == pytest.approx(full.history[1]["val_loss"], rel=1e-6)
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_weights_are_used_and_resume_keeps_them(tmp_path: Path) -> None:
    import pytest

    tr, va = _data(range(3)), _data(range(100, 101))
    cfg = TrainConfig(epochs=2, steps_per_epoch=3, batch_size=4, warmup_steps=1, seed=2, noise_res=(4,), patience=10,
                      ema=0.5, local_prob=0.5)
    plain = train(tr, va, UCFG, TrainConfig(**{**cfg.to_dict(), "ema": 0.0}), device="cpu", progress=False)
    full = train(tr, va, UCFG, cfg, device="cpu", progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), full.model.state_dict().values()))
    state = tmp_path / "m.pt.state"
    train(tr, va, UCFG, cfg, device="cpu", state_path=state, progress=False, max_epochs_this_run=1)
    resumed = train(tr, va, UCFG, cfg, device="cpu", state_path=state, resume=True, progress=False)
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ema"):
        train(tr, va, UCFG, TrainConfig(**{**cfg.to_dict(), "ema": 1.0}), device="cpu", progress=False)
