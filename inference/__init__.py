"""Pure ML: backbones, scorers, calibration and pictures. Imports nothing about Kafka.

The public surface is small on purpose::

    scorer = inference.create_scorer("patch-knn")   # DINOv2-S, layers 5+8, 224 px
    scorer.fit(normal_images)
    results = scorer.score(frames)                   # list[ScoreResult]
"""

from inference import _torchvision_fix  # noqa: F401 - must run before anything imports torchvision
from inference.calibration import Thresholds, thresholds_from_normals
from inference.scoring import NoopScorer, PatchKNNScorer, Scorer, ScoreResult

SCORERS = ("patch-knn", "noop")


def create_scorer(name: str = "patch-knn", *, image_size: int = 224,
                  layers: tuple[int, ...] = (5, 8), weights: str | None = None,
                  device: str = "cpu") -> Scorer:
    """Build a scorer by name. ``noop`` exists only to measure pipeline overhead."""
    if name == "patch-knn":
        from inference.backbones import DinoV2Backbone

        return PatchKNNScorer(DinoV2Backbone(weights, image_size=image_size, layers=layers),
                              device=device)
    if name == "noop":
        return NoopScorer()
    raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")


__all__ = ["SCORERS", "NoopScorer", "PatchKNNScorer", "ScoreResult", "Scorer", "Thresholds",
           "create_scorer", "thresholds_from_normals"]
