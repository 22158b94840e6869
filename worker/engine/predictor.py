"""Inference: load a checkpoint once, then ``predict(volume) -> Prediction``."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .baselines import ZScoreAtlas
from .brainmask import BrainMasker
from .checkpoint import CheckpointError, load_checkpoint
from .domain import check_domain, describe
from .model import UNet, UNetConfig
from .postprocess import Finding, clean_mask, extract_findings, study_score
from .orient import to_axial
from .preprocess import (
    PreprocessConfig,
    Preprocessed,
    PreprocessError,
    context_stack,
    context_stride,
    erode_mm,
    from_model_grid,
    model_spacing,
    preprocess,
)
from .scoring import (
    ScoringConfig,
    component_keys,
    feature_residual,
    fuse,
    intensity_outlier,
    median_smooth,
    pixel_zscore,
    residual_map,
    ssim_map,
    to_unit,
)
from .train import amp_dtype, cpu_has_bf16, select_device
from .volume import Volume

__all__ = ["Prediction", "Components", "Predictor"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict`, on the input volume's grid.

    Attributes
    ----------
    mask:
        Boolean anomaly mask ``(z, y, x)``.
    anomaly_map:
        float32 in 0..1; ``anomaly_map >= 0.5`` ⇔ raw score ≥ threshold.
    findings:
        Connected regions after 3D post-processing (largest first).
    study_score:
        Mean of the top minimum-volume voxels' scores over the threshold
        (> 1 suggests an abnormal study).
    threshold:
        Calibrated threshold on the raw score of the checkpoint's method.
    timings:
        Seconds spent in ``preprocess``, ``inference`` and ``postprocess``.
    domain:
        The series checked against what the model was trained and calibrated
        on (:func:`~worker.engine.domain.check_domain`)::

            {"in_domain": bool,
             "warnings": ["slice spacing 8 mm is outside the training range 1-6.6 mm", ...],
             "checks": {"slice_spacing_mm": {"value": 8.0, "range": [1.0, 6.6], "ok": False}, ...}}

        Empty for checkpoints that carry no training-domain record.
    """

    mask: np.ndarray
    anomaly_map: np.ndarray
    findings: list[Finding]
    study_score: float
    threshold: float
    timings: dict[str, float] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)


@dataclass
class Components:
    """Component score maps on the source grid plus the scoring region.

    ``pre.fg_source`` is on the source grid too; ``pre``'s model-grid arrays
    are on the axial grid the model saw. ``measures`` describe the series for
    the training-domain check (:mod:`.domain`).
    """

    maps: dict[str, np.ndarray]
    region: np.ndarray
    pre: Preprocessed
    seconds: dict[str, float] = field(default_factory=dict)
    measures: dict[str, float] = field(default_factory=dict)


class Predictor:
    """A loaded anomaly model.

    Parameters
    ----------
    model:
        The U-Net (weights loaded).
    meta:
        Checkpoint metadata.
    tensors:
        Extra checkpoint tensors (baseline atlas).
    device:
        ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda"``.
    checksum:
        sha256 of the checkpoint file.
    batch_size:
        Slices per forward pass.
    amp:
        ``"auto"``, ``"on"`` or ``"off"``; on CPU bf16 is only kept when it
        matches fp32 numerically.

    Raises
    ------
    ValueError
        When CUDA is requested but unavailable, or a brain-region model has
        no brain-mask network.
    """

    def __init__(self, model: UNet, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
                 device: str = "auto", checksum: str = "", batch_size: int = 32, amp: str = "auto") -> None:
        self.meta = meta
        self.device = select_device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.preprocess_cfg = PreprocessConfig.from_dict(meta["preprocess"])
        self.scoring = ScoringConfig.from_dict(meta["scoring"])
        self.atlas = ZScoreAtlas.from_tensors(tensors or {})
        self.brain_masker = BrainMasker.from_checkpoint_parts(meta, tensors or {}, self.device)
        if self.preprocess_cfg.region == "brain" and self.brain_masker is None:
            raise ValueError("the checkpoint scores the brain but carries no brain-mask network")
        self.checksum = checksum
        self.batch_size = int(batch_size)
        self.dtype = amp_dtype(self.device, amp)
        if self.device.type == "cpu" and self.dtype is not None:
            self.dtype = self.dtype if self._bf16_matches() else None
        if self.device.type == "cpu" and amp == "auto" and not cpu_has_bf16():
            self.dtype = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", batch_size: int = 32,
                        amp: str = "auto") -> "Predictor":
        """Load a checkpoint file.

        Raises
        ------
        CheckpointError
            When the file is missing, corrupted or incompatible.
        """
        ck = load_checkpoint(Path(path))
        try:
            model = UNet(UNetConfig.from_dict(ck.meta["arch"]))
            model.load_state_dict(ck.state_dict, strict=True)
            PreprocessConfig.from_dict(ck.meta["preprocess"])
            ScoringConfig.from_dict(ck.meta["scoring"])
            masker = BrainMasker.from_checkpoint_parts(ck.meta, ck.tensors, "cpu")
            if PreprocessConfig.from_dict(ck.meta["preprocess"]).region == "brain" and masker is None:
                raise ValueError("the checkpoint scores the brain but carries no brain-mask network")
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {Path(path).name} is incompatible with this code: {exc}") from None
        if ck.meta["scoring"].get("threshold") is None:
            log.warning("checkpoint %s is not calibrated; run 'pacs-node calibrate'", Path(path).name)
        # device errors (CUDA unavailable: ValueError) stay what they are
        return cls(model, ck.meta, ck.tensors, device=device, checksum=ck.sha256, batch_size=batch_size, amp=amp)

    @property
    def model_name(self) -> str:
        """Human-readable model name from the checkpoint."""
        return str(self.meta.get("model_name", "unnamed"))

    @property
    def model_version(self) -> str:
        """Code version plus a short weights checksum, e.g. ``pacs-node-engine/0.1.0+1a2b3c4d5e6f``."""
        return f"{self.meta.get('code_version', 'unknown')}+{(self.checksum or 'nochecksum')[:12]}"

    # ---------------------------------------------------------------- inference
    def _bf16_matches(self, tol: float = 0.02) -> bool:
        c, (h, w) = self.model.cfg.in_channels, self.preprocess_cfg.size
        g = torch.Generator().manual_seed(0)
        x = torch.nn.functional.avg_pool2d(torch.rand((2, c, h, w), generator=g), 5, 1, 2)
        with torch.inference_mode():
            ref = self.model(x.to(self.device))
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                low = self.model(x.to(self.device)).float()
        err = float((ref - low).abs().max())
        log.debug("bf16 vs fp32 max abs difference %.4f", err)
        return err < tol

    def _batches(self, stack: np.ndarray) -> Iterator[tuple[slice, torch.Tensor]]:
        """``stack`` in batches on the predictor's device (channels_last on CPU), to run under :meth:`_autocast`."""
        for i in range(0, stack.shape[0], self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(stack[i:i + self.batch_size])).to(self.device)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            yield slice(i, i + len(x)), x

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def reconstruct(self, stack: np.ndarray) -> np.ndarray:
        """Run the U-Net on ``(z, C, H, W)`` slices in batches; returns ``(z, H, W)``."""
        out = np.empty((stack.shape[0], stack.shape[2], stack.shape[3]), np.float32)
        with torch.inference_mode():
            for rows, x in self._batches(stack):
                with self._autocast():
                    y = self.model(x).float()
                    if self.scoring.tta:
                        y = 0.5 * (y + self.model(x.flip(-1)).float().flip(-1))
                out[rows] = y[:, 0].cpu().numpy()
        return out

    def feature_residual(self, stack: np.ndarray, recon_stack: np.ndarray) -> np.ndarray:
        """Feature-space residual at the U-Net's first encoder level, in batches.

        Parameters
        ----------
        stack, recon_stack:
            ``(z, C, H, W)`` network inputs built from the image and from its
            reconstruction (the same 2.5D context).

        Returns
        -------
        np.ndarray
            ``(z, H, W)`` float32, see :func:`~worker.engine.scoring.feature_residual`.
        """
        encoder = self.model.enc[0]
        out = np.empty((stack.shape[0], stack.shape[2], stack.shape[3]), np.float32)
        with torch.inference_mode():
            # Each input batch goes through the encoder together with its reconstruction.
            for (rows, x), (_, r) in zip(self._batches(stack), self._batches(recon_stack)):
                with self._autocast():
                    f = encoder(torch.cat([x, r])).float().cpu().numpy()
                out[rows] = feature_residual(f[:len(x)], f[len(x):])
        return out

    def components(self, volume: Volume, keys: Iterable[str] | None = None) -> Components:
        """Compute component score maps on the source grid.

        Parameters
        ----------
        volume:
            Input volume.
        keys:
            Components to compute (``"residual"``, ``"ssim"``,
            ``"feature"``, ``"intensity:<pol>"``, ``"pixel_zscore:<pol>"``); default: those
            the checkpoint's method needs.

        Returns
        -------
        Components
            Median-filtered maps restricted to the eroded foreground.

        Raises
        ------
        PreprocessError
            When the volume has no usable foreground.
        ValueError
            For an unknown key, or ``pixel_zscore`` without an atlas.
        """
        keys = list(keys) if keys is not None else component_keys(self.scoring)
        t0 = time.perf_counter()
        pcfg, scfg = self.preprocess_cfg, self.scoring
        orient = None
        if pcfg.reorient:
            volume, orient = to_axial(volume)
        brain = self.brain_mask(volume) if pcfg.region == "brain" else None
        pre = preprocess(volume, pcfg, region=brain)
        grid = pre.grid
        # The scoring region (foreground eroded by erode_mm) is computed on the
        # model grid, where the scores are, and mapped back: eroding the
        # source-resolution mask costs O(voxels x element) (23 s for 400
        # slices of 256 x 256) for a boundary that is only ever known to the
        # model's pixel size.
        region_m = erode_mm(pre.fg, model_spacing(volume, pcfg.size, grid), scfg.erode_mm)
        if not region_m.any():
            region_m = pre.fg
        region_src = (from_model_grid(volume, region_m.astype(np.float32), linear=True, grid=grid) > 0.5) & pre.fg_source
        if not region_src.any():
            region_src = pre.fg_source
        measures = describe(volume, pre.fg_source, pre.image[pre.fg]) if "domain" in self.meta else {}
        t1 = time.perf_counter()
        model_maps: dict[str, np.ndarray] = {}
        if any(k in ("residual", "ssim", "feature") for k in keys):
            stride = context_stride(volume.spacing[0], pcfg.context_mm)
            stack = context_stack(pre.image, pcfg.context, stride)
            recon = self.reconstruct(stack)
            recon = np.where(pre.fg, recon, 0.0).astype(np.float32)
            if "feature" in keys:
                feature = self.feature_residual(stack, context_stack(recon, pcfg.context, stride))
            del stack
        t2 = time.perf_counter()
        for k in keys:
            name, _, pol = k.partition(":")
            if name == "residual":
                m = residual_map(pre.image, recon, scfg.edge_weight, region_m if scfg.slice_offset else None)
            elif name == "ssim":
                m = ssim_map(pre.image, recon)
            elif name == "feature":
                m = feature
            elif name == "intensity":
                m = intensity_outlier(pre.image, region_m if region_m.any() else pre.fg, pol or scfg.polarity)
            elif name == "pixel_zscore":
                if self.atlas is None:
                    raise ValueError("checkpoint has no z-score atlas")
                mean, std = self.atlas.lookup(pre.image.shape[0])
                m = pixel_zscore(pre.image, mean, std, pol or scfg.polarity)
            else:
                raise ValueError(f"unknown score component {k!r}")
            model_maps[k] = median_smooth(m * region_m, scfg.median_size, scfg.smooth_sigma)
        maps = {k: np.maximum(from_model_grid(volume, v, linear=True, grid=grid), 0.0) * region_src
                for k, v in model_maps.items()}
        if orient is not None and not orient.identity:
            maps = {k: orient.back(v) for k, v in maps.items()}
            region_src = orient.back(region_src)
            pre = Preprocessed(image=pre.image, fg=pre.fg, fg_source=orient.back(pre.fg_source), grid=grid)
        t3 = time.perf_counter()
        return Components(maps=maps, region=region_src, pre=pre,
                          seconds={"preprocess": t1 - t0, "inference": t2 - t1, "score": t3 - t2}, measures=measures)

    def brain_mask(self, volume: Volume) -> np.ndarray:
        """The brain mask of the checkpoint's brain-mask network on ``volume``'s grid.

        Raises
        ------
        PreprocessError
            When the checkpoint has no brain-mask network or no brain is found.
        """
        if self.brain_masker is None:
            raise PreprocessError("this model has no brain-mask network")
        return self.brain_masker.predict(volume)

    def finalize(self, volume: Volume, score: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, list[Finding], float]:
        """Threshold, post-process in 3D and describe findings.

        Returns
        -------
        tuple
            ``(mask, anomaly_map, findings, study_score)``.
        """
        scfg = self.scoring
        amap = to_unit(score, threshold)
        labels, _ = clean_mask(score >= threshold, volume.spacing, scfg.min_volume_mm3, scfg.closing, scfg.fill_holes)
        mask = labels > 0
        findings = extract_findings(labels, amap, volume)
        top = int(math.ceil(scfg.min_volume_mm3 / volume.voxel_volume_mm3))
        return mask, amap, findings, study_score(score, threshold, top)

    def predict(self, volume: Volume) -> Prediction:
        """Detect anomalies in one volume.

        Parameters
        ----------
        volume:
            Source volume (any in-plane size and spacing).

        Returns
        -------
        Prediction
            Mask, map and findings on the input grid.

        Raises
        ------
        CheckpointError
            When the checkpoint was never calibrated.
        PreprocessError
            When the volume has no usable foreground.
        """
        thr = self.scoring.threshold
        if thr is None:
            raise CheckpointError("model is not calibrated (no threshold); run 'pacs-node calibrate'")
        comp = self.components(volume)
        t0 = time.perf_counter()
        score = fuse(comp.maps, self.scoring)
        mask, amap, findings, sscore = self.finalize(volume, score, float(thr))
        t1 = time.perf_counter()
        timings = {
            "preprocess": comp.seconds["preprocess"],
            "inference": comp.seconds["inference"],
            "postprocess": comp.seconds["score"] + (t1 - t0),
        }
        domain = check_domain(self.meta.get("domain"), comp.measures)
        if domain and not domain["in_domain"]:
            log.warning("series outside the model's training domain: %s", "; ".join(domain["warnings"]))
        return Prediction(mask=mask, anomaly_map=amap, findings=findings, study_score=sscore,
                          threshold=float(thr), timings=timings, domain=domain)
