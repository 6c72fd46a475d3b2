"""Pure ML: backbones, scorers, calibration, metrics and pictures. Imports nothing about Kafka.

The public surface is small on purpose::

    scorer = inference.create_scorer("patch-knn")                 # DINOv2-S, layers 5+8, 224 px
    scorer = inference.create_scorer("winclip+", backbone="openclip:ViT-B-16-plus-240",
                                     weights="/models/vit_b16_plus_240_laion400m_e31.bin")
    scorer.fit(normal_images)
    results = scorer.score(frames)                                 # list[ScoreResult]

Methods: ``patch-knn`` (nearest patch on any visual backbone), ``winclip``
(zero-shot, needs a CLIP backbone), ``winclip+`` (zero- plus few-shot), and
``noop`` (scores nothing; only for measuring pipeline overhead). Backbones:
``dinov2-s`` and ``efficientnet-lite0`` (installable from the package registry)
and ``openclip:ARCH`` with a local ``weights`` file.
"""

from inference import _torchvision_fix  # noqa: F401 - must run before anything imports torchvision
from inference.calibration import Thresholds, thresholds_from_normals
from inference.scoring import NoopScorer, PatchKNNScorer, Scorer, ScoreResult

METHODS = ("patch-knn", "winclip", "winclip+", "noop")
BACKBONES = ("dinov2-s", "efficientnet-lite0", "openclip:ARCH")


def create_backbone(backbone: str = "dinov2-s", *, weights: str | None = None,
                    image_size: int | None = None, layers: tuple[int, ...] | None = None,
                    random_init: bool = False, precision: str = "fp32"):
    """Build a backbone by name from local files (see :data:`BACKBONES`).

    ``precision``: bf16 | fp16 (CLIP backbones, for GPUs) and int8 (CLIP and DINOv2
    image towers, for CPUs) trade exactness for speed; fp32 is exact.
    """
    if precision in ("bf16", "fp16") and not backbone.startswith("openclip:"):
        raise ValueError(f"--precision {precision} is implemented for openclip: backbones; "
                         f"{backbone} runs in fp32 (or int8 on CPU for dinov2-s)")
    if precision == "int8" and backbone == "efficientnet-lite0":
        raise ValueError("--precision int8 is implemented for the ViT backbones (dinov2-s, "
                         "openclip:); efficientnet-lite0 runs in fp32")
    if backbone == "dinov2-s":
        from inference.backbones import DinoV2Backbone

        return DinoV2Backbone(weights, image_size=image_size or 224, layers=layers or (5, 8),
                              precision=precision)
    if backbone == "efficientnet-lite0":
        from inference.backbones import EfficientNetLite0Backbone

        return EfficientNetLite0Backbone(weights, image_size=image_size or 256,
                                         stages=layers or (2, 3))
    if backbone.startswith("openclip:"):
        from inference.clip import OpenCLIPBackbone

        if image_size is not None:
            raise ValueError("a CLIP backbone works at its own resolution; do not pass an image size")
        return OpenCLIPBackbone(backbone.removeprefix("openclip:"), weights, random_init=random_init,
                                precision=precision)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def create_scorer(name: str = "patch-knn", *, backbone: str | None = None, image_size: int | None = None,
                  layers: tuple[int, ...] | None = None, weights: str | None = None,
                  class_name: str = "object", device: str = "cpu", random_init: bool = False,
                  reference_augment: str = "none", zoom: bool = False, zoom_top_k: int = 2,
                  zoom_crop: float = 0.35, adapt_steps: int = 0, precision: str = "fp32") -> Scorer:
    """Build a scorer by method name (see :data:`METHODS`) on the named backbone.

    ``zoom`` adds the ROI zoom pass (:mod:`inference.zoom`): a second patch-knn on the
    same backbone scores crops of the frame's hottest regions at full resolution.
    """
    if name == "noop":
        return NoopScorer()
    if precision == "int8":
        from inference.int8 import check_int8_device

        check_int8_device(device)
    if (zoom or adapt_steps) and name != "patch-knn":
        raise ValueError("ROI zoom and adaptation are implemented for patch-knn; turn them off for "
                         + name)
    if name == "patch-knn":
        bb = create_backbone(backbone or "dinov2-s", weights=weights, image_size=image_size,
                             layers=layers, random_init=random_init, precision=precision)
        scorer = PatchKNNScorer(bb, device=device, augment=reference_augment, adapt_steps=adapt_steps)
        if zoom:
            from inference.zoom import ZoomScorer

            crop = PatchKNNScorer(bb, device=device, augment=reference_augment)
            return ZoomScorer(scorer, crop, top_k=zoom_top_k, crop_frac=zoom_crop)
        return scorer
    if name in ("winclip", "winclip+"):
        from inference.winclip import WinCLIPScorer

        backbone = backbone or "openclip:ViT-B-16-plus-240"
        if not backbone.startswith("openclip:"):
            raise ValueError(f"{name} needs a CLIP backbone with a text encoder (openclip:ARCH), "
                             f"not {backbone!r}; use patch-knn for visual-only backbones")
        if reference_augment != "none":
            raise ValueError("reference augmentation is implemented for patch-knn only")
        bb = create_backbone(backbone, weights=weights, image_size=image_size, random_init=random_init,
                             precision=precision)
        return WinCLIPScorer(bb, class_name=class_name, few_shot=name == "winclip+", device=device)
    raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(METHODS)}")


__all__ = ["BACKBONES", "METHODS", "NoopScorer", "PatchKNNScorer", "ScoreResult", "Scorer", "Thresholds",
           "create_backbone", "create_scorer", "thresholds_from_normals"]
