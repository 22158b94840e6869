"""A plain-torch 2D/2.5D U-Net for reconstruction of normal anatomy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UNetConfig", "UNet"]


@dataclass
class UNetConfig:
    """Architecture hyper-parameters (stored in the checkpoint).

    Attributes
    ----------
    in_channels:
        Input channels (``2 * context + 1`` for 2.5D).
    out_channels:
        Output channels (the reconstructed centre slice).
    depth:
        Number of resolution levels (``depth - 1`` poolings); each level has a
        skip connection.
    base:
        Channels at the first level; doubled at each level.
    norm:
        ``"group"``, ``"instance"`` or ``"none"``.
    groups:
        Groups for GroupNorm (reduced automatically when not dividing).
    max_channels:
        Upper bound on channels per level.
    residual_output:
        Predict a correction added to the centre input slice (global skip,
        DnCNN-style): normal structure passes through unchanged and the
        network only learns to undo deviations from normal anatomy.
    """

    in_channels: int = 3
    out_channels: int = 1
    depth: int = 4
    base: int = 16
    norm: str = "group"
    groups: int = 8
    max_channels: int = 256
    residual_output: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        TypeError
            For unknown keys.
        """
        return cls(**d)


def _norm(kind: str, ch: int, groups: int) -> nn.Module:
    if kind == "group":
        g = min(groups, ch)
        while ch % g:
            g -= 1
        return nn.GroupNorm(g, ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r} (group, instance, none)")


class _Block(nn.Module):
    """Two 3x3 convolutions, each followed by normalisation and SiLU."""

    def __init__(self, cin: int, cout: int, norm: str, groups: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
            _norm(norm, cout, groups),
            nn.SiLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"),
            _norm(norm, cout, groups),
            nn.SiLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class UNet(nn.Module):
    """Encoder–decoder with skip connections at every level.

    Parameters
    ----------
    cfg:
        Architecture configuration.

    Raises
    ------
    ValueError
        When ``depth < 2`` or the normalisation is unknown.

    Notes
    -----
    Input height and width must be divisible by ``2 ** (depth - 1)``. The
    output is the reconstruction of the centre input channel.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.depth < 2:
            raise ValueError("U-Net depth must be >= 2")
        self.cfg = cfg
        chans = [min(cfg.base * 2**i, cfg.max_channels) for i in range(cfg.depth)]
        self.enc = nn.ModuleList()
        cin = cfg.in_channels
        for c in chans:
            self.enc.append(_Block(cin, c, cfg.norm, cfg.groups))
            cin = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(cfg.depth - 1, 0, -1):
            self.up.append(nn.ConvTranspose2d(chans[i], chans[i - 1], 2, stride=2))
            self.dec.append(_Block(2 * chans[i - 1], chans[i - 1], cfg.norm, cfg.groups))
        self.head = nn.Conv2d(chans[0], cfg.out_channels, 1)

    @property
    def multiple(self) -> int:
        """Required divisor of the input height and width."""
        return 2 ** (self.cfg.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct; ``x`` is ``(N, in_channels, H, W)``."""
        c = self.cfg.in_channels // 2
        inp = x[:, c:c + self.cfg.out_channels] if self.cfg.residual_output else None
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < len(self.enc) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        out = self.head(x)
        return out + inp if inp is not None else out
