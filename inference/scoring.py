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

import dataclasses
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from inference.backbones import DinoV2Backbone, PatchBackbone
from inference.settings import DEFAULTS, MAX_MEMORY_TOLERANCE, TEST_VIEWS

log = logging.getLogger(__name__)


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
    ``mode`` says, for scorers whose basis changes while they run (mutual scoring:
    warm-up, mutual, few-shot), which one scored this frame; None for the others.
    """

    score: float
    anomaly_map: np.ndarray
    full_map: bool = True
    embedding: np.ndarray | None = None
    mode: str | None = None  # zero-shot scorers: how it was scored (settings.MUTUAL_MODES)
    # where a camera's bank lowered the score (stream_bank): the score against the references
    # alone, the scale its thresholds and drift reference were measured on
    reference_score: float | None = None
    # what the scorer needs to remember this frame later (its stream and features, for the
    # admit() of scorers with per-camera banks); opaque to everyone else
    stream_state: object | None = field(default=None, repr=False, compare=False)

    @property
    def score_without_bank(self) -> float:
        """The score against the references alone: ``reference_score`` where a camera's bank
        lowered it, the score itself otherwise. What the bank cannot vouch for: drift compares
        it with calibration, and a worker admits a frame to the bank only when this is below
        the alert threshold (a recurring defect never teaches itself in)."""
        return self.score if self.reference_score is None else self.reference_score


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


# test-time views of a frame (``test_views``): flips of its (height, width) axes. Each is its own
# inverse and keeps the frame's shape, so a view's patch grid (tiles included) is flipped back
# onto the frame's before its distances are averaged with the others'.
TEST_VIEW_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flips": ((), (1,), (0,), (0, 1)),  # as seen, mirrored left-right, top-bottom, turned 180 degrees
}
assert tuple(TEST_VIEW_FLIPS) == TEST_VIEWS  # settings.TEST_VIEWS names them for the command line


TILE_ASPECT = 1.5  # frames whose long side is >= 1.5x the short side are scored as tiles
MAX_TILES = 8  # a backbone pass per tile: beyond 8:1 the tiles themselves are squashed


def tile_grid(height: int, width: int, tiling: bool = True) -> tuple[int, int]:
    """(rows, cols) of near-square tiles a frame is cut into before the backbone.

    The backbone sees a square; a 500x1263 steel strip squashed into one loses
    60 % of its long side's resolution, so a thin crack shrinks below a patch.
    Cut along the long side into ``round(long / short)`` equal pieces instead,
    each piece resized to the model's square on its own: the pixel scale stays
    about the short side's in both directions. Pieces do not overlap, so their
    patch grids join edge to edge into one (rows*g, cols*g) grid and the frame
    is still one map and one set of patches (a seam is an image border to the
    backbone, as the frame's own edges are). Frames within 1.5:1 of square are
    one tile: there, squashing costs less than a second backbone pass. At most
    ``MAX_TILES``, so a freak 1x5000 frame costs 8 passes, not 5000.
    """
    if not tiling or min(height, width) <= 0:
        return 1, 1
    long, short = max(height, width), min(height, width)
    if long < TILE_ASPECT * short:
        return 1, 1
    n = min(MAX_TILES, max(2, round(long / short)))
    return (n, 1) if height > width else (1, n)


def aggregate_patches(features: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """(B, H, W, D) unit-norm patch features -> (B, H, W, D * len(sizes)) unit norm: for each
    r in ``sizes`` the mean over the r x r neighbourhood (PatchCore's local aggregation;
    borders average what exists), renormalised, side by side. With (1, 3) a patch is
    matched on itself and on its surroundings at once: one nearest memory patch must agree
    on both, which sharpens maps of objects at high resolution (benchmarks/fewshot.py).
    ``(1,)`` returns the features unchanged."""
    if sizes == (1,):
        return features
    x = features.permute(0, 3, 1, 2)
    parts = []
    for r in sizes:
        y = x if r == 1 else torch.nn.functional.avg_pool2d(x, r, 1, r // 2, count_include_pad=False)
        parts.append(torch.nn.functional.normalize(y, dim=1))
    return (torch.cat(parts, dim=1) / len(sizes) ** 0.5).permute(0, 2, 3, 1).contiguous()


def cut_tiles(image: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    """``image`` cut into rows x cols equal pieces, row-major (the last take the remainder)."""
    h, w = image.shape[:2]
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    return [image[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] for r in range(rows) for c in range(cols)]


@dataclass
class PreparedFrames:
    """Frames kept ready to be scored again as the reference memory grows, with no
    backbone pass: their patch features (float16, half the memory of float32; the
    distances they give differ from a full pass by ~1e-4) and each patch's distance to
    the nearest memory patch. Only :class:`PatchKNNScorer` makes them.

    ``results`` are the frames' full results when they were prepared (float32 features).
    """

    groups: list[FrameGroup]  # frames of one tile grid each (their patch counts differ)
    memory_rows: int  # memory rows [0, memory_rows) are already in ``nearest``
    memory_epoch: int  # the memory they were matched against (fit() starts a new one)
    feature_epoch: int  # the feature map (an adapted head changes it)
    results: list[ScoreResult]


@dataclass
class FrameGroup:
    """Prepared frames that share one tile grid, so their patches stack into one tensor."""

    index: list[int]  # positions in the prepared list
    features: torch.Tensor  # (V, N, P, D) float16, unit-norm rows, per test view
    nearest: torch.Tensor  # (V, N, P) float32 cosine distance to the nearest patch of the view's memory


class CameraBanks:
    """What scorers with per-camera banks (``self.banks``, a :class:`StreamBanks`) share: a
    worker sets ``max_streams`` to its --max-cameras and drops silent cameras' banks."""

    banks: StreamBanks

    @property
    def banks_forgotten(self) -> int:
        """Cameras whose bank was dropped for a newer one (``max_streams``)."""
        return self.banks.forgotten

    @property
    def max_streams(self) -> int:
        return self.banks.max_streams

    @max_streams.setter
    def max_streams(self, n: int) -> None:
        self.banks.max_streams = n

    def forget(self, streams: Sequence[Hashable]) -> None:
        """Drop cameras' banks (silent cameras, or partitions that moved to another worker)."""
        self.banks.forget(streams)


class NotFittedError(RuntimeError):
    """score() was called before fit() gave the scorer any normal references."""


class PatchKNNScorer(CameraBanks):
    """Few-shot nearest-patch scoring on a visual backbone (AnomalyDINO-style).

    Each patch of a test frame is compared with every patch of the reference
    images; its anomaly is the cosine distance to the nearest one, so a defect is
    anything that looks like no part of any normal image. Tokens of several
    intermediate layers are L2-normalised and concatenated: middle layers keep
    the local texture that small defects disturb, later ones add context.
    The image score is the mean of the top 1% patch distances, which is steadier
    than the single maximum on noisy frames. Frames far from square are scored as
    tiles (:func:`tile_grid`), references likewise; ``aggregate`` adds each patch's
    neighbourhood means (:func:`aggregate_patches`). What was tried and not kept
    (PCA subspace, map smoothing, finer rotations) is in ``benchmarks/fewshot.py``.

    ``stream_bank`` > 0 also compares each frame with its camera's recent frames (a
    line's own stream holds normal variety that a few references cannot: stains, grain,
    pose), as mutual scoring does (:func:`bank_patch_scores`); a patch scores the lower of
    its distance to the references and its bank score. So a frame never scores higher
    than against the references alone, and thresholds calibrated on the references alone
    keep their false-alarm bound. The bank is consulted once it holds ``warmup`` frames;
    frames enter it through :meth:`admit` (a worker passes its committed frames that did
    not alert). Measured in ``benchmarks/stream_bank.py``.

    ``test_views`` ``"flips"`` also scores each frame mirrored left-right, top-bottom and turned
    180 degrees, each view against the references seen the same way (a memory per view, so
    what counts as normal, and a part's orientation, mean what they meant), the maps flipped
    back and averaged before the image score: four backbone passes of the same frame see its
    patches through four different contexts, and a defect shows in all of them where a
    view's noise does not (``benchmarks/fewshot.py``, "test-time views").
    """

    name = "patch-knn"

    def __init__(
        self,
        backbone: PatchBackbone | None = None,
        top_fraction: float = 0.01,
        device: str | torch.device = "cpu",
        augment: str = "none",
        adapt_steps: int = 0,
        tiling: bool = True,
        aggregate: tuple[int, ...] = (1,),
        memory_tolerance: float = 0.0,
        stream_bank: int = 0,
        warmup: int = DEFAULTS.warmup,
        max_streams: int = 256,
        test_views: str = "none",
    ) -> None:
        if stream_bank and not 2 <= warmup <= stream_bank:
            raise ValueError(f"need 2 <= warmup <= stream_bank, got warmup {warmup}, bank {stream_bank}")
        if test_views not in TEST_VIEW_FLIPS:
            raise ValueError(f"test_views must be one of {', '.join(TEST_VIEWS)}, got {test_views!r}")
        if stream_bank and test_views != "none":
            raise ValueError("a camera's bank holds one view of each frame: stream_bank needs "
                             "test_views 'none'")
        self.test_views = test_views
        self.views = TEST_VIEW_FLIPS[test_views]
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        self.adapt_steps = adapt_steps  # > 0: train a head on pseudo-anomalies at fit (inference/adapt.py)
        self.head: torch.nn.Module | None = None
        self.adapt_report = None
        self.backbone = (backbone or DinoV2Backbone()).to(device)
        self.device = torch.device(device)
        self.top_fraction = top_fraction
        self.augment = augment
        self.tiling = tiling  # frames far from square are cut into tiles (tile_grid)
        self.aggregate = tuple(aggregate)  # neighbourhood sizes (aggregate_patches)
        if not 0.0 <= memory_tolerance <= MAX_MEMORY_TOLERANCE:
            raise ValueError(f"memory_tolerance must be a cosine distance in [0, "
                             f"{MAX_MEMORY_TOLERANCE}], got {memory_tolerance}")
        self.memory_tolerance = memory_tolerance  # novelty filter on added frames (add_normals)
        self._memory: torch.Tensor | None = None  # (V, M, D): per test view, unit-norm rows
        self._memory_epoch = 0  # +1 each time fit() replaces the memory (rows only append between)
        self._feature_epoch = 0  # +1 each time fit() trains a new head
        self.stream_bank, self.warmup = stream_bank, warmup
        self.banks = StreamBanks(max(1, stream_bank), max_streams)  # (P, D) float16 rows per frame
        self.bank_failures = 0  # camera banks that could not be matched (scored by the references)

    @property
    def memory_size(self) -> int:
        return 0 if self._memory is None else int(self._memory.shape[-2])

    def raw_patch_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, H, W, D) unit-norm concatenated layer features of the frozen backbone."""
        return self._patch_features(self.backbone.preprocess(list(images)).to(self.device))

    def _patch_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        parts = [torch.nn.functional.normalize(p.float(), dim=-1) for p in feats.patch_tokens]
        return torch.nn.functional.normalize(torch.cat(parts, dim=-1), dim=-1)

    def _square_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(V, B, g, g, D): each image in every test view, each view's grid flipped back onto
        the image's, so patch (y, x) of every view is the same place. The views are flipped on
        the device after preprocessing (resizing is done once: on a GPU the CPU's resize, not
        the backbone, is what a frame waits for), all in one backbone batch."""
        x = self.backbone.preprocess(list(images)).to(self.device)  # (B, 3, S, S)
        if len(self.views) > 1:
            x = torch.cat([x.flip([2 + a for a in v]) if v else x for v in self.views])
        f = self._patch_features(x)
        if self.head is not None:
            with torch.no_grad():
                f = self.head(f)
        f = f.reshape(len(self.views), len(images), *f.shape[1:])
        if len(self.views) == 1:
            return f
        return torch.stack([f[m].flip([1 + a for a in v]) if v else f[m] for m, v in enumerate(self.views)])

    def _aggregate(self, f: torch.Tensor) -> torch.Tensor:
        """:func:`aggregate_patches` of (V, n, H, W, D) features, view by view."""
        return aggregate_patches(f.flatten(0, 1), self.aggregate).reshape(*f.shape[:-1], -1)

    def _grouped_features(self, images: Sequence[np.ndarray]) -> list[tuple[list[int], torch.Tensor]]:
        """Frames grouped by tile grid: [(positions, (V, n, rows*g, cols*g, D) features)], V the
        test views (1 without), one backbone batch for all tiles of all frames. A view keeps a
        tile's shape, so each tile is flipped on its own and the frame's grid is joined as
        without views."""
        grids = [tile_grid(im.shape[0], im.shape[1], self.tiling) for im in images]
        if all(g == (1, 1) for g in grids):
            return [(list(range(len(images))), self._aggregate(self._square_features(images)))]
        pieces = [t for im, (r, c) in zip(images, grids, strict=True) for t in cut_tiles(im, r, c)]
        f = self._square_features(pieces)
        start = np.cumsum([0] + [r * c for r, c in grids])
        out = []
        for grid in dict.fromkeys(grids):
            idx = [i for i, g in enumerate(grids) if g == grid]
            r, c = grid
            t = torch.stack([f[:, start[i]:start[i + 1]] for i in idx], dim=1)  # (V, n, r*c, g, g, D)
            v, n, _, gh, gw, d = t.shape
            t = t.reshape(v, n, r, c, gh, gw, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(v, n, r * gh, c * gw, d)
            out.append((idx, self._aggregate(t)))
        return out

    def fit(self, normals: Sequence[np.ndarray]) -> None:
        """Replace the memory with ``normals``' patches (and train the head, with
        ``adapt_steps``). A failure midway (the model, out of memory) restores the scorer as it
        was: a learning worker refits while it scores, and a scorer left with no memory would
        fail every frame until the retry."""
        if len(normals) == 0:
            raise ValueError("fit() needs at least one normal reference image")
        before = (self._memory, self._memory_epoch, self.head, self.adapt_report, self._feature_epoch)
        try:
            self._memory = None
            self._memory_epoch += 1
            if self.adapt_steps > 0:
                from inference.adapt import train_head

                self.head = None
                self._feature_epoch += 1
                with torch.enable_grad():
                    self.head, self.adapt_report = train_head(self, normals, steps=self.adapt_steps)
            self.add_normals(normals)
        except BaseException:
            self._memory, self._memory_epoch, self.head, self.adapt_report, self._feature_epoch = before
            raise

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        """Append the normals' patches (every view) to the memory. With ``memory_tolerance``
        > 0, view by view, only patches farther than it (cosine distance) from every patch
        already kept are appended (a view's own patches are not compared with each other):
        a line that learns hundreds of normals keeps what is new in them, not 256 rows a
        frame that mostly repeat the references (see :func:`novel_rows` for what that does
        to scores)."""
        if len(normals) == 0:
            return
        self.add_views([v for views in self.memory_views(normals) for v in views])

    def memory_views(self, normals: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        """Per normal, the (V, P, D) rows (one (P, D) per test view) of each of its reference
        views (``augment``) that :meth:`add_normals` offers the memory (before the novelty
        filter): what a learning worker keeps of a learned frame, so that a refit after
        evicting old ones needs no backbone pass (:meth:`fit_views`)."""
        if len(normals) == 0:
            return []
        counts = [len(augmented_views(im, self.augment)) for im in normals]
        views = [v for im in normals for v in augmented_views(im, self.augment)]
        per_view: list[torch.Tensor] = [torch.empty(0)] * len(views)
        for idx, f in self._grouped_features(views):
            for j, i in enumerate(idx):
                per_view[i] = f[:, j].reshape(f.shape[0], -1, f.shape[-1])
        starts = np.cumsum([0, *counts]).tolist()
        return [per_view[a:b] for a, b in itertools.pairwise(starts)]

    def _rows(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Rows from :meth:`memory_views` as float32 (V, P, D) on the device; (P, D) is one
        view's (a scorer without test views)."""
        rows = [v.to(self.device, torch.float32) for v in views]
        rows = [r[None] if r.dim() == 2 else r for r in rows]
        bad = next((tuple(r.shape) for r in rows if r.dim() != 3 or r.shape[0] != len(self.views)), None)
        if bad is not None:
            raise ValueError(f"memory rows of shape {bad}: this scorer keeps {len(self.views)} test "
                             f"view(s) of each patch ({self.test_views!r}), (V, P, D)")
        return rows

    def add_views(self, views: Sequence[torch.Tensor]) -> None:
        """Append rows from :meth:`memory_views` (any float type), through the novelty filter
        (a patch is dropped only where every test view of it has a kept row that near)."""
        self._memory = novel_rows(self._memory, self._rows(views), self.memory_tolerance)

    def fit_views(self, views: Sequence[torch.Tensor]) -> None:
        """:meth:`fit` from rows :meth:`memory_views` gave, without the backbone. Not with a
        trained head (``adapt_steps``): fit() trains it again on the normals, and the rows
        change with it."""
        if self.adapt_steps > 0:
            raise RuntimeError("fit_views() cannot retrain the adapted head: call fit() with the images")
        if len(views) == 0:
            raise ValueError("fit_views() needs at least one view's rows")
        memory = novel_rows(None, self._rows(views), self.memory_tolerance)  # an error keeps the old memory
        self._memory, self._memory_epoch = memory, self._memory_epoch + 1

    def score(self, images: Sequence[np.ndarray],
              streams: Sequence[Hashable] | None = None) -> list[ScoreResult]:
        """Score RGB uint8 frames; ``streams``: each frame's camera, whose bank it is also
        compared with (``stream_bank`` > 0; ignored otherwise, and None: no bank)."""
        if self._memory is None:
            raise NotFittedError("PatchKNNScorer.score() called before fit()")
        if len(images) == 0:
            return []
        if streams is not None and len(streams) != len(images):
            raise ValueError(f"{len(streams)} stream keys for {len(images)} frames")
        out: list[ScoreResult | None] = [None] * len(images)
        for idx, f in self._grouped_features(images):
            results, dist = self._results(f)
            if self.stream_bank and streams is not None:  # one test view (the constructor's check)
                results = self._with_banks(results, dist.mean(dim=0), f[0], [streams[i] for i in idx])
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    # -- the camera's own recent frames beside the references (stream_bank) ----------------
    @property
    def per_camera(self) -> bool:
        """Whether frames should be scored with their camera (``score(images, streams)``) and
        admitted to its bank: a worker asks this."""
        return self.stream_bank > 0

    def _with_banks(self, results: list[ScoreResult], dist: torch.Tensor, f: torch.Tensor,
                    streams: list[Hashable]) -> list[ScoreResult]:
        """Results whose patches also met their camera's bank (once it holds ``warmup``
        frames): per patch the lower of the two scores; each keeps its rows for admit(). The
        frames of one camera are matched against its bank in one product."""
        rows = f.reshape(f.shape[0], -1, f.shape[-1])  # (n, P, D): frames of one tile grid
        out = [dataclasses.replace(r, stream_state=(key, rows[j].to("cpu", torch.float16)))
               for j, (r, key) in enumerate(zip(results, streams, strict=True))]
        for key in dict.fromkeys(streams):
            bank = self.banks.frames(key)
            if len(bank) < self.warmup:
                continue
            idx = [j for j, k in enumerate(streams) if k == key]
            try:
                others = [b.to(self.device, torch.float32)[None] for b in bank]
                query = rows[idx].reshape(1, -1, rows.shape[-1])  # patches are scored independently
                patch = torch.minimum(dist[idx], bank_patch_scores(query, others).reshape(len(idx), -1))
            except Exception as exc:  # not the frames' fault: the references alone are the bound
                self.bank_failures += 1
                if self.bank_failures % 100 == 1:  # the first, then every 100th: not a flood
                    log.warning("the bank of camera %r could not be matched (%s: %s); its frames are "
                                "scored against the references alone (%d such failures so far)",
                                key, type(exc).__name__, exc, self.bank_failures)
                continue
            scores = self._image_scores(patch).tolist()
            for n, j in enumerate(idx):
                out[j] = dataclasses.replace(
                    out[j], score=float(scores[n]), reference_score=out[j].score,
                    anomaly_map=patch[n].reshape(out[j].anomaly_map.shape).cpu().numpy().astype(np.float32))
        return out

    def admit(self, results: Sequence[ScoreResult]) -> None:
        """Put scored frames into their cameras' banks (a worker passes its committed frames
        whose ``score_without_bank`` is below the alert threshold: the bank is what normal
        looks like, and cannot vouch for its own members). Results scored without a camera,
        or with ``stream_bank`` 0, carry nothing to keep."""
        if not self.stream_bank:
            return
        for r in results:
            if r.stream_state is None:
                raise ValueError("admit() takes results of score() with streams")
            key, rows = r.stream_state  # type: ignore[misc]
            self.banks.add(key, rows)

    def _results(self, f: torch.Tensor) -> tuple[list[ScoreResult], torch.Tensor]:
        """Results of (V, B, H, W, D) features (per test view) against the whole memory, and
        their (V, B, H*W) nearest-patch distances, each view against its own memory; a
        frame's map is the views' mean. The embedding is the frame's as seen (view 0), so
        drift means the same with or without test views."""
        assert self._memory is not None
        v, b, h, w, d = f.shape
        dist = torch.stack([_nearest(f[m].reshape(b, h * w, d), self._memory[m]) for m in range(v)])
        mean = dist.mean(dim=0)
        img_scores = self._image_scores(mean)
        maps = mean.reshape(b, h, w).cpu().numpy().astype(np.float32)
        emb = torch.nn.functional.normalize(f[0].reshape(b, h * w, d).mean(dim=1), dim=-1)
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
        by_grid: dict[tuple[int, ...], tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        results: list[ScoreResult | None] = [None] * len(images)
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            for idx, f in self._grouped_features(chunk):
                res, dist = self._results(f)
                index, feats, nearest = by_grid.setdefault(tuple(f.shape[2:4]), ([], [], []))
                index += [i + j for j in idx]
                feats.append(f.reshape(*f.shape[:2], -1, f.shape[-1]).to(torch.float16))
                nearest.append(dist)
                for j, r in zip(idx, res, strict=True):
                    results[i + j] = r
            if on_batch is not None:
                on_batch(len(chunk))
        groups = [FrameGroup(index, torch.cat(feats, dim=1), torch.cat(nearest, dim=1))
                  for index, feats, nearest in by_grid.values()]
        return PreparedFrames(groups, self.memory_size, self._memory_epoch, self._feature_epoch,
                              results)  # type: ignore[arg-type]

    def rescore(self, prepared: PreparedFrames) -> list[float] | None:
        """Image scores of prepared frames under the memory as it is now, matching them only
        against rows added since (adding normals can only bring nearest patches closer).
        A memory rebuilt by fit() is matched in full, still without the backbone. None when
        the features themselves are stale (a newly trained head): prepare the frames again."""
        if prepared.feature_epoch != self._feature_epoch or self._memory is None:
            return None
        scores = [0.0] * len(prepared.results)
        for g in prepared.groups:
            views = range(g.features.shape[0])
            if prepared.memory_epoch != self._memory_epoch:
                g.nearest = torch.stack([_nearest(g.features[m], self._memory[m]) for m in views])
            elif prepared.memory_rows < self.memory_size:
                fresh = torch.stack([_nearest(g.features[m], self._memory[m, prepared.memory_rows:])
                                     for m in views])
                g.nearest = torch.minimum(g.nearest, fresh)
            for i, v in zip(g.index, self._image_scores(g.nearest.mean(dim=0)).tolist(), strict=True):
                scores[i] = v
        prepared.memory_rows, prepared.memory_epoch = self.memory_size, self._memory_epoch
        return scores


class StreamBanks:
    """Each stream's (camera's) newest frames, bounded twice: ``size`` frames a stream, and
    ``max_streams`` streams, the least recently fed forgotten (stream keys come from outside:
    cameras). Used by mutual scoring and by patch-knn's ``stream_bank``."""

    def __init__(self, size: int, max_streams: int = 256) -> None:
        if size < 1 or max_streams < 1:
            raise ValueError(f"need a bank of at least 1 frame and 1 stream, got {size}, {max_streams}")
        self.size, self.max_streams = size, max_streams
        self._banks: OrderedDict[Hashable, deque] = OrderedDict()
        self.forgotten = 0  # streams whose bank was dropped for a newer one (max_streams)

    def frames(self, key: Hashable) -> list:
        """The stream's frames, oldest first (empty for a stream never fed)."""
        return list(self._banks.get(key, ()))

    def add(self, key: Hashable, frame: object) -> None:
        """Append ``frame`` to the stream's bank (its oldest frame falls out when full)."""
        bank = self._banks.get(key)
        if bank is None:
            bank = self._banks[key] = deque(maxlen=self.size)
            while len(self._banks) > self.max_streams:
                gone, _ = self._banks.popitem(last=False)
                self.forgotten += 1
                if self.forgotten % 100 == 1:  # the first, then every 100th: not a flood
                    log.warning("more than %d cameras feed banks here: forgot the bank of %r "
                                "(%d forgotten so far); its frames warm up again. Raise "
                                "--max-cameras or spread the cameras over more workers",
                                self.max_streams, gone, self.forgotten)
        self._banks.move_to_end(key)
        bank.append(frame)

    def forget(self, keys: Sequence[Hashable]) -> None:
        """Drop these streams' banks (a stream fed again starts empty)."""
        for k in keys:
            self._banks.pop(k, None)


def frame_distances(query: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """(V, P, J): for each of V feature variants and P query patches (``query`` (V, P, D),
    unit-norm rows), the cosine distance to its nearest patch in each of the J other frames
    (each (V, p_j, D); frames of one patch count are matched in one product)."""
    cols = []
    by_p: dict[int, list[int]] = {}
    for j, o in enumerate(others):
        by_p.setdefault(o.shape[1], []).append(j)
    order: list[int] = []
    for p, js in by_p.items():
        bank = torch.cat([others[j] for j in js], dim=1).float()  # (V, len(js)*p, D)
        sims = torch.bmm(query.float(), bank.transpose(1, 2))  # (V, P, len(js)*p)
        v, q = sims.shape[:2]
        cols.append(1.0 - sims.reshape(v, q, len(js), p).amax(dim=-1))
        order += js
    d = torch.cat(cols, dim=-1).clamp_min_(0.0)
    if order != sorted(order):
        d = d[..., torch.as_tensor(np.argsort(order))]
    return d


BANK_KEEP = 0.3  # the share of other frames, the closest, whose distances a patch's score averages


def bank_patch_scores(query: torch.Tensor, others: Sequence[torch.Tensor],
                      keep: float = BANK_KEEP) -> torch.Tensor:
    """(P,) mutual scores (MuSc): per variant and patch, the mean of the lowest ``keep``
    fraction of its nearest distances to the other frames, averaged over the variants. A few
    frames with the same defect at the same place are outvoted by those that show it normal."""
    d = frame_distances(query, others)
    k = max(1, round(keep * d.shape[-1]))
    return d.topk(k, dim=-1, largest=False).values.mean(dim=-1).mean(dim=0)


def novel_rows(memory: torch.Tensor | None, frames: Sequence[torch.Tensor], tolerance: float,
               consolidate: int = 16, give_up_after: int = 8, give_up_kept: float = 0.9) -> torch.Tensor:
    """``memory`` grown by each (P, D) frame of ``frames`` in turn, keeping only its rows
    whose cosine distance to the nearest row kept so far exceeds ``tolerance`` (a frame added
    to an empty memory is kept whole).

    Why this is safe for the thresholds: every dropped row lies within ``tolerance`` of a kept
    one, so a query's nearest distance can only grow, and by at most what the triangle
    inequality on unit vectors allows: sqrt(d_kept) <= sqrt(d_all) + sqrt(tolerance). A
    defect never scores lower than with the whole memory, and calibration frames are
    scored against the same kept memory, so thresholds measure exactly what decides.
    The search over the kept rows stays exact (no approximate index). New rows are gathered
    in parts, merged every ``consolidate`` frames, so refitting 200 frames copies little.

    Frames may also be (V, P, D): V feature variants of the same P patches, each matched in
    its own (V, M, D) memory (mutual scoring's layers). A patch is then dropped only where
    every variant has a kept row within ``tolerance``, so the bound holds variant by variant.

    When ``give_up_after`` frames in a row each keep at least ``give_up_kept`` of their rows
    (a texture: every patch is new), the rest of this call appends without searching: the
    search would only cost time (a refit of 204 magnetic-tile frames: 23-27 s on 2 cores), and
    keeping a row never loosens the bound."""
    parts: list[torch.Tensor] = [] if memory is None else [memory]
    novel_streak = 0
    for rows in frames:
        if parts and tolerance > 0 and novel_streak < give_up_after:  # 0 keeps every row
            keep = _novelty(rows, parts) > tolerance
            novel_streak = novel_streak + 1 if int(keep.sum()) >= give_up_kept * len(keep) else 0
            rows = rows[..., keep, :]
        if rows.shape[-2]:
            parts.append(rows)
        if len(parts) > consolidate:
            parts = [torch.cat(parts, dim=-2)]
    if not parts:
        raise ValueError("novel_rows() needs at least one frame or a memory")
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def _novelty(rows: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(P,): each row's cosine distance to its nearest row in ``parts``; for (V, P, D) rows,
    the largest over the variants of that distance (a patch is as new as its newest view)."""
    if rows.dim() == 2:
        return torch.stack([_nearest(rows[None], part)[0] for part in parts]).amin(dim=0)
    per_variant = [torch.stack([_nearest(rows[v][None], part[v])[0] for part in parts]).amin(dim=0)
                   for v in range(rows.shape[0])]
    return torch.stack(per_variant).amax(dim=0)


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
