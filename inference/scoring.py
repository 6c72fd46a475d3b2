"""The scorer interface the worker talks to, and the scorers that implement it.

A scorer is fitted on a handful of normal images (few-shot) and then scores
batches of frames. Every scorer returns one :class:`ScoreResult` per frame, in
input order, with an image-level score and a low-resolution anomaly map; the
map is upsampled only where a person will look at it (overlays), never in the
per-frame hot path.

The CLIP-based methods (WinCLIP, WinCLIP+) plug in by implementing the same
:class:`Scorer` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from inference.backbones import DinoV2Backbone, PatchBackbone


@dataclass(frozen=True)
class ScoreResult:
    """One frame's verdict from a scorer.

    ``score`` grows with abnormality; its scale is the scorer's own, which is why
    thresholds are calibrated per line from normal frames, never hard-coded.
    ``anomaly_map`` is (h, w) float32 on the model's grid, covering the whole frame.
    ``full_map`` is False when a lazy cascade skipped the expensive map of a
    frame far below the review band; its map is then the coarse single-pass one.
    ``embedding`` is a unit-length summary of the frame in the backbone's feature
    space (mean patch feature, or CLIP's image embedding); monitoring compares
    its recent mean with the calibration frames' to notice the line changing.
    """

    score: float
    anomaly_map: np.ndarray
    full_map: bool = True
    embedding: np.ndarray | None = None


@runtime_checkable
class Scorer(Protocol):
    """What the worker needs from a scoring method."""

    name: str

    def fit(self, normals: Sequence[np.ndarray]) -> None:
        """Build the reference memory from RGB uint8 images of normal parts."""

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        """Grow the reference memory (operator verdicts use this)."""

    def score(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        """Score RGB uint8 frames; results in input order."""


AUGMENTS = ("none", "rotate", "rotate+flip")


def augmented_views(image: np.ndarray, augment: str) -> list[np.ndarray]:
    """The reference image plus the views ``augment`` asks for.

    With one or two shots the memory has seen each part in one orientation only;
    parts that may arrive rotated (round parts seen from above, tiles, textures)
    are better described by the reference in all four right-angle rotations,
    optionally mirrored. Parts with a fixed pose should keep ``none``.
    """
    views = [image]
    if augment in ("rotate", "rotate+flip"):
        views += [np.ascontiguousarray(np.rot90(image, k)) for k in (1, 2, 3)]
    if augment == "rotate+flip":
        views += [np.ascontiguousarray(v[:, ::-1]) for v in list(views)]
    return views


@dataclass
class PreparedFrames:
    """Frames kept ready to be scored again as the reference memory grows, with no
    backbone pass: their patch features (float16, half the memory of float32; the
    distances they give differ from a full pass by ~1e-4) and each patch's distance to
    the nearest memory patch. Only :class:`PatchKNNScorer` makes them.

    ``results`` are the frames' full results when they were prepared (float32 features).
    """

    features: torch.Tensor  # (N, P, D) float16, unit-norm rows
    nearest: torch.Tensor  # (N, P) float32 cosine distance to the nearest memory patch
    memory_rows: int  # memory rows [0, memory_rows) are already in ``nearest``
    memory_epoch: int  # the memory they were matched against (fit() starts a new one)
    feature_epoch: int  # the feature map (an adapted head changes it)
    results: list[ScoreResult]


class NotFittedError(RuntimeError):
    """score() was called before fit() gave the scorer any normal references."""


class PatchKNNScorer:
    """Few-shot nearest-patch scoring on a visual backbone (AnomalyDINO-style).

    Each patch of a test frame is compared with every patch of the reference
    images; its anomaly is the cosine distance to the nearest one, so a defect is
    anything that looks like no part of any normal image. Tokens of several
    intermediate layers are L2-normalised and concatenated: middle layers keep
    the local texture that small defects disturb, later ones add context.
    The image score is the mean of the top 1% patch distances, which is steadier
    than the single maximum on noisy frames.
    """

    name = "patch-knn"

    def __init__(
        self,
        backbone: PatchBackbone | None = None,
        top_fraction: float = 0.01,
        device: str | torch.device = "cpu",
        augment: str = "none",
        adapt_steps: int = 0,
    ) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        self.adapt_steps = adapt_steps  # > 0: train a head on pseudo-anomalies at fit (inference/adapt.py)
        self.head: torch.nn.Module | None = None
        self.adapt_report = None
        self.backbone = (backbone or DinoV2Backbone()).to(device)
        self.device = torch.device(device)
        self.top_fraction = top_fraction
        self.augment = augment
        self._memory: torch.Tensor | None = None  # (M, D), unit norm
        self._memory_epoch = 0  # +1 each time fit() replaces the memory (rows only append between)
        self._feature_epoch = 0  # +1 each time fit() trains a new head

    @property
    def memory_size(self) -> int:
        return 0 if self._memory is None else int(self._memory.shape[0])

    def raw_patch_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, H, W, D) unit-norm concatenated layer features of the frozen backbone."""
        x = self.backbone.preprocess(list(images)).to(self.device)
        feats = self.backbone(x)
        parts = [torch.nn.functional.normalize(p.float(), dim=-1) for p in feats.patch_tokens]
        return torch.nn.functional.normalize(torch.cat(parts, dim=-1), dim=-1)

    def _patch_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        f = self.raw_patch_features(images)
        if self.head is not None:
            with torch.no_grad():
                f = self.head(f)
        return f

    def fit(self, normals: Sequence[np.ndarray]) -> None:
        if len(normals) == 0:
            raise ValueError("fit() needs at least one normal reference image")
        self._memory = None
        self._memory_epoch += 1
        if self.adapt_steps > 0:
            from inference.adapt import train_head

            self.head = None
            self._feature_epoch += 1
            with torch.enable_grad():
                self.head, self.adapt_report = train_head(self, normals, steps=self.adapt_steps)
        self.add_normals(normals)

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        if len(normals) == 0:
            return
        f = self._patch_features([v for im in normals for v in augmented_views(im, self.augment)])
        flat = f.reshape(-1, f.shape[-1])
        self._memory = flat if self._memory is None else torch.cat([self._memory, flat])

    def score(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        if self._memory is None:
            raise NotFittedError("PatchKNNScorer.score() called before fit()")
        if len(images) == 0:
            return []
        return self._results(self._patch_features(images))[0]

    def _results(self, f: torch.Tensor) -> tuple[list[ScoreResult], torch.Tensor]:
        """Results of (B, H, W, D) features against the whole memory, and their (B, H*W)
        nearest-patch distances."""
        assert self._memory is not None
        b, h, w, d = f.shape
        dist = _nearest(f.reshape(b, h * w, d), self._memory)
        img_scores = self._image_scores(dist)
        maps = dist.reshape(b, h, w).cpu().numpy().astype(np.float32)
        emb = torch.nn.functional.normalize(f.reshape(b, h * w, d).mean(dim=1), dim=-1)
        return [
            ScoreResult(score=float(s), anomaly_map=m, embedding=e)
            for s, m, e in zip(img_scores.tolist(), maps, emb.float().cpu().numpy(), strict=True)
        ], dist

    def _image_scores(self, dist: torch.Tensor) -> torch.Tensor:
        k = max(1, round(self.top_fraction * dist.shape[1]))
        return dist.topk(k, dim=1).values.mean(dim=1)

    # -- frames scored again and again (calibration frames) ------------------------------
    def prepare(self, images: Sequence[np.ndarray], batch_size: int = 8,
                on_batch: Callable[[int], object] | None = None) -> PreparedFrames:
        """Score ``images`` (batches of ``batch_size``) and keep what :meth:`rescore` needs."""
        if self._memory is None:
            raise NotFittedError("PatchKNNScorer.prepare() called before fit()")
        feats, nearest, results = [], [], []
        for i in range(0, len(images), batch_size):
            f = self._patch_features(images[i:i + batch_size])
            res, dist = self._results(f)
            feats.append(f.reshape(f.shape[0], -1, f.shape[-1]).to(torch.float16))
            nearest.append(dist)
            results.extend(res)
            if on_batch is not None:
                on_batch(f.shape[0])
        return PreparedFrames(torch.cat(feats), torch.cat(nearest), self.memory_size,
                              self._memory_epoch, self._feature_epoch, results)

    def rescore(self, prepared: PreparedFrames) -> list[float] | None:
        """Image scores of prepared frames under the memory as it is now, matching them only
        against rows added since (adding normals can only bring nearest patches closer).
        A memory rebuilt by fit() is matched in full, still without the backbone. None when
        the features themselves are stale (a newly trained head): prepare the frames again."""
        if prepared.feature_epoch != self._feature_epoch or self._memory is None:
            return None
        if prepared.memory_epoch != self._memory_epoch:
            prepared.nearest = _nearest(prepared.features, self._memory)
        elif prepared.memory_rows < self.memory_size:
            fresh = _nearest(prepared.features, self._memory[prepared.memory_rows:])
            prepared.nearest = torch.minimum(prepared.nearest, fresh)
        prepared.memory_rows, prepared.memory_epoch = self.memory_size, self._memory_epoch
        return self._image_scores(prepared.nearest).tolist()


def _nearest(features: torch.Tensor, memory: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(N, P) cosine distance of each of (N, P, D) unit-norm features to its nearest row of
    the (M, D) memory, in chunks of ``chunk`` patches so the similarity matrix stays small."""
    n, p, d = features.shape
    flat = features.reshape(n * p, d)
    out = torch.empty(n * p, dtype=torch.float32, device=flat.device)
    for i in range(0, n * p, chunk):
        sims = flat[i:i + chunk].to(memory.dtype) @ memory.T
        out[i:i + chunk] = (1.0 - sims.max(dim=1).values).clamp_min_(0.0)
    return out.reshape(n, p)


class NoopScorer:
    """Returns zero for every frame without looking at it.

    Exists only to measure the pipeline's own overhead (``--scorer noop`` in the
    benchmark); never the default, and the worker logs loudly when it is used.
    """

    name = "noop"

    def fit(self, normals: Sequence[np.ndarray]) -> None:
        return None

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        return None

    def score(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        return [ScoreResult(0.0, np.zeros((1, 1), np.float32)) for _ in images]
