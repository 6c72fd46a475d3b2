"""Pure ML: backbones, scorers, calibration, metrics and pictures. Imports nothing about Kafka.

The public surface is small on purpose::

    scorer = inference.create_scorer("patch-knn")                 # DINOv2-S, layers 5+8, 224 px
    scorer = inference.create_scorer("winclip+", backbone="openclip:ViT-B-16-plus-240",
                                     weights="/models/vit_b16_plus_240_laion400m_e31.bin")
    scorer.fit(normal_images)
    results = scorer.score(frames)                                 # list[ScoreResult]

Methods: ``patch-knn`` (nearest patch on any visual backbone), ``mutual`` (zero-shot:
frames scored by the other frames of their stream, no references; few-shot once
operators confirm normals), ``anomalyclip`` (zero-shot with learned object-agnostic
prompts, needs a CLIP backbone and a prompt file), ``winclip``
(zero-shot, needs a CLIP backbone), ``winclip+`` (zero- plus few-shot), and
``noop`` (scores nothing; only for measuring pipeline overhead). Backbones:
``dinov2-s`` and ``efficientnet-lite0`` (installable from the package registry)
and ``openclip:ARCH`` with a local ``weights`` file.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from inference.settings import METHODS, VISUAL_BACKBONES, ScorerSettings, SettingsError

if TYPE_CHECKING:
    from inference.calibration import Thresholds, thresholds_from_normals
    from inference.scoring import NoopScorer, PatchKNNScorer, Scorer, ScoreResult

# torch loads on first use of these, so settings (and a command line's --help) stay instant;
# inference.backbones and inference.clip apply the torchvision fix before anything else
_LAZY = {"Thresholds": "inference.calibration", "thresholds_from_normals": "inference.calibration",
         "NoopScorer": "inference.scoring", "PatchKNNScorer": "inference.scoring",
         "Scorer": "inference.scoring", "ScoreResult": "inference.scoring"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")

BACKBONES = (*VISUAL_BACKBONES, "openclip:ARCH")


def set_torch_threads(n: int | None) -> None:
    """CPU threads for the model; None or 0 leaves torch's choice (set 1-2 per worker when
    several share a machine)."""
    if n:
        import torch

        torch.set_num_threads(n)


def create_backbone(backbone: str = "dinov2-s", *, weights: str | None = None,
                    image_size: int | None = None, layers: tuple[int, ...] | None = None,
                    random_init: bool = False, precision: str = "fp32"):
    """Build a backbone by name from local files (see :data:`BACKBONES`), its options checked
    by :class:`ScorerSettings` (the one validation: e.g. ``layers`` on a CLIP backbone, which
    would be ignored, raises ``SettingsError``).

    ``precision``: bf16 | fp16 (CLIP backbones, for GPUs) and int8 (CLIP and DINOv2
    image towers, for CPUs) trade exactness for speed; fp32 is exact.
    """
    method = "winclip" if backbone.startswith("openclip:") else "patch-knn"
    return _backbone(ScorerSettings(method=method, backbone=backbone, weights=weights,
                                    image_size=image_size, layers=layers, random_init=random_init,
                                    precision=precision))


def _backbone(s: ScorerSettings):
    s = s.resolved()
    bb = s.resolved_backbone or ""
    if bb == "dinov2-s":
        from inference.backbones import DinoV2Backbone

        return DinoV2Backbone(s.weights, image_size=s.image_size, layers=s.layers, precision=s.precision)
    if bb == "efficientnet-lite0":
        from inference.backbones import EfficientNetLite0Backbone

        return EfficientNetLite0Backbone(s.weights, image_size=s.image_size, stages=s.layers)
    from inference.clip import OpenCLIPBackbone  # validate() admits nothing else

    return OpenCLIPBackbone(bb.removeprefix("openclip:"), s.weights, random_init=s.random_init,
                            precision=s.precision, image_size=s.image_size)


def create_scorer(name: str = "patch-knn", *, device: str = "cpu", **settings) -> Scorer:
    """Build a scorer by method name (see :data:`METHODS`); ``settings`` are the fields of
    :class:`~inference.settings.ScorerSettings` (backbone, image_size, zoom, ...), validated
    there: an option the method or backbone would ignore raises ``SettingsError``.

    ``zoom`` adds the ROI zoom pass (:mod:`inference.zoom`): a second patch-knn on the
    same backbone scores crops of the frame's hottest regions at full resolution.
    """
    return ScorerSettings(method=name, **settings).build(device)


def _build(s: ScorerSettings, device: str) -> Scorer:
    from inference.scoring import NoopScorer, PatchKNNScorer

    if s.method == "noop":
        return NoopScorer()
    if s.precision == "int8":
        from inference.int8 import check_int8_device

        check_int8_device(device)
    bb = _backbone(s)
    if s.method in ("patch-knn", "mutual"):
        tolerance = float(s.resolved().memory_tolerance or 0.0)
        # spelled out, so a profile keeps the tolerance its thresholds were measured with
        # even if the backbone's default changes later
        s = dataclasses.replace(s, memory_tolerance=tolerance)
    if s.method == "patch-knn":
        scorer = PatchKNNScorer(bb, device=device, augment=s.reference_augment,
                                adapt_steps=s.adapt_steps, tiling=s.tiling, aggregate=s.aggregate,
                                memory_tolerance=tolerance, stream_bank=s.stream_bank, warmup=s.warmup,
                                test_views=s.test_views)
        if s.zoom:
            from inference.zoom import ZoomScorer

            crop = PatchKNNScorer(bb, device=device, augment=s.reference_augment, tiling=s.tiling,
                                  aggregate=s.aggregate, memory_tolerance=tolerance)
            scorer = ZoomScorer(scorer, crop, top_k=s.zoom_top_k, crop_frac=s.zoom_crop)
    elif s.method == "mutual":
        from inference.mutual import MutualScorer

        scorer = MutualScorer(bb, sizes=s.aggregate, bank_size=s.bank_size, warmup=s.warmup,
                              tiling=s.tiling, memory_tolerance=tolerance, device=device)
    elif s.method == "anomalyclip":
        from inference.anomalyclip import AnomalyCLIPScorer, load_prompts

        scorer = AnomalyCLIPScorer(bb, load_prompts(bb, s.prompts), device=device)
    else:
        from inference.winclip import WinCLIPScorer

        scorer = WinCLIPScorer(bb, class_name=s.class_name, few_shot=s.method == "winclip+",
                               device=device)
    scorer.settings = s  # what built it: a profile stores this, a worker checks it
    return scorer


__all__ = ["BACKBONES", "METHODS", "NoopScorer", "PatchKNNScorer", "ScoreResult", "Scorer", "ScorerSettings",
           "SettingsError", "Thresholds", "create_backbone", "create_scorer", "set_torch_threads",
           "thresholds_from_normals"]
