"""Zero-shot scoring by mutual scoring of unlabeled frames (after MuSc, ICLR 2024).

A new product on the line has no references, but it has a stream: most frames
are normal, and a defect looks like nothing at the same place in the other
frames. So every frame is scored against other unlabeled frames:

1. Patch features of each backbone layer, averaged over r x r neighbourhoods
   for each r in ``sizes`` (MuSc's LNAMD; PatchCore's local aggregation): r = 1
   finds small defects, larger r finds larger ones.
2. For a patch of frame i and another frame j, the distance to its nearest
   patch anywhere in j (cosine distance of unit-norm features).
3. The patch's score is the mean of the lowest ``keep`` fraction of those
   distances over the other frames: a few frames with the same defect at the same
   place (which would make the patch look normal against them) are outvoted, while
   the frames that show it normal decide. Then the mean over layers and sizes.
4. The image score is the mean of the top ``top_fraction`` of its patch scores.

Two ways to use it: :meth:`MutualScorer.score_batch` scores a set of frames
against each other (the paper's protocol: the whole test set as the unlabeled
set), and :meth:`MutualScorer.score` scores each frame against a bounded
rolling bank of its own stream's recent frames (``stream`` keys, e.g. cameras), as
a worker does. A stream whose bank holds fewer than ``warmup`` frames is in
warm-up: its frames are scored against what there is (bank and the other
frames of the same call), and marked so (``ScoreResult.mode == "warm-up"``),
because a score from two or three comparisons is not yet a verdict.

Operator-confirmed normals (:meth:`add_normals`) turn the scorer few-shot:
once ``few_shot_after`` of them are in its memory, frames are scored by their
nearest patch in those references, on the same features (AnomalyDINO), and
the banks are no longer consulted (with 99 confirmed normals a bank beside
them changed nothing measurable: ``python -m benchmarks.stream_bank --scorer
mutual``). Nothing here is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from inference.backbones import DinoV2Backbone, PatchBackbone
from inference.scoring import (
    CameraBanks,
    PatchKNNScorer,
    ScoreResult,
    StreamBanks,
    aggregate_patches,
    bank_patch_scores,
    frame_distances,
    novel_rows,
)
from inference.settings import DEFAULTS
from inference.settings import MUTUAL_MODES as MODES


@dataclass
class FrameFeatures:
    """One frame's features for mutual scoring: (V, P, D) unit-norm rows, V = layers x sizes."""

    variants: torch.Tensor  # float16 in banks and memories (half the memory), float32 for scoring
    grid: tuple[int, int]  # (h, w) patches, P = h * w
    embedding: np.ndarray

    def stored(self) -> FrameFeatures:
        """The float16 copy kept in banks, memories and prepared calibration frames."""
        return FrameFeatures(self.variants.half(), self.grid, self.embedding)


@dataclass
class PreparedMutual:
    """Calibration frames kept ready to be scored few-shot again as the memory grows, with
    no backbone pass (their float16 features); see :class:`inference.calibration.CalibrationFrames`."""

    features: list[FrameFeatures]
    results: list[ScoreResult]

    def extend(self, other: PreparedMutual) -> None:
        self.features += other.features
        self.results += other.results


class MutualScorer(CameraBanks):
    """Zero-shot scoring of frames by the other frames of their stream (see module doc)."""

    name = "mutual"

    def __init__(self, backbone: PatchBackbone | None = None, *, sizes: tuple[int, ...] = (1,),
                 keep: float = 0.3, bank_size: int = DEFAULTS.bank_size, warmup: int = DEFAULTS.warmup,
                 few_shot_after: int | None = 1,
                 top_fraction: float = 0.01, tiling: bool = True, max_streams: int = 256,
                 memory_tolerance: float = 0.0, device: str | torch.device = "cpu") -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if not 2 <= warmup <= bank_size:
            raise ValueError(f"need 2 <= warmup <= bank_size, got warmup {warmup}, bank {bank_size}")
        # one extractor for tiles and layers, so frames are cut exactly as patch-knn cuts them
        self._extract = PatchKNNScorer(backbone or DinoV2Backbone(), device=device, tiling=tiling,
                                       memory_tolerance=memory_tolerance)  # validates it
        self.memory_tolerance = memory_tolerance  # novelty filter on confirmed normals (add_normals)
        self.backbone = self._extract.backbone
        self.device = self._extract.device
        self.sizes, self.keep, self.top_fraction = tuple(sizes), keep, top_fraction
        self.bank_size, self.warmup, self.few_shot_after = bank_size, warmup, few_shot_after
        self.banks = StreamBanks(bank_size, max_streams)
        self._confirmed = 0  # confirmed normals in the memory
        self._memory: torch.Tensor | None = None  # (V, M, D) reference patches
        self.map_gate: float | None = None  # unused; the worker sets it on every scorer

    # -- features ------------------------------------------------------------------------
    def features(self, images: Sequence[np.ndarray]) -> list[FrameFeatures]:
        """Each frame's (V, P, D) variants: per layer, per neighbourhood size."""
        out: list[FrameFeatures | None] = [None] * len(images)
        n_layers = len(self.backbone.layers) if hasattr(self.backbone, "layers") else 1
        for idx, views in self._extract._grouped_features(images):  # (1, n, H, W, L*D): one view
            f = views[0]
            n, h, w, d = f.shape
            per_layer = [torch.nn.functional.normalize(p, dim=-1)
                         for p in f.split(d // n_layers, dim=-1)]
            variants = [aggregate_patches(p, (r,)) for p in per_layer for r in self.sizes]
            v = torch.stack(variants, dim=1).reshape(n, len(variants), h * w, -1)  # (n, V, P, D)
            emb = torch.nn.functional.normalize(f.reshape(n, h * w, d).mean(dim=1), dim=-1)
            for k, i in enumerate(idx):
                out[i] = FrameFeatures(v[k].contiguous(), (h, w), emb[k].float().cpu().numpy())
        return out  # type: ignore[return-value]

    # -- the core: nearest-patch distances to other frames -------------------------------
    @staticmethod
    def _distances(query: torch.Tensor, others: Sequence[FrameFeatures]) -> torch.Tensor:
        """(V, P, J): for each variant and query patch, the distance to its nearest patch in
        each of the J other frames."""
        return frame_distances(query, [o.variants for o in others])

    def _patch_scores(self, query: FrameFeatures, others: Sequence[FrameFeatures]) -> torch.Tensor:
        """(P,) mutual score: mean over variants of the mean of the lowest ``keep`` fraction
        of the per-frame nearest distances."""
        return bank_patch_scores(query.variants, [o.variants for o in others], self.keep)

    def _result(self, f: FrameFeatures, patch: torch.Tensor, mode: str,
                stream: Hashable = None) -> ScoreResult:
        assert mode in MODES
        k = max(1, round(self.top_fraction * patch.numel()))
        score = float(patch.topk(k).values.mean())
        amap = patch.reshape(f.grid).cpu().numpy().astype(np.float32)
        return ScoreResult(score=score, anomaly_map=amap, embedding=f.embedding, mode=mode,
                           stream_state=(stream, f))

    # -- the batch protocol ---------------------------------------------------------------
    def score_batch(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        """Score a set of unlabeled frames against each other (at least 2)."""
        if len(images) < 2:
            raise ValueError("mutual scoring needs at least 2 frames to compare")
        feats = self.features(images)
        return self.score_features(feats)

    def score_features(self, feats: Sequence[FrameFeatures], mode: str = "mutual") -> list[ScoreResult]:
        """Mutual scores of frames whose features are computed (each against all the others)."""
        return [self._result(f, self._patch_scores(f, [o for j, o in enumerate(feats) if j != i]), mode)
                for i, f in enumerate(feats)]

    # -- the stream protocol ---------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``few-shot`` once ``few_shot_after`` confirmed normals are in the memory (None:
        only after :meth:`start_few_shot`), else ``mutual``."""
        if self.few_shot_after is None or not self._confirmed:
            return "mutual"
        return "few-shot" if self._confirmed >= self.few_shot_after else "mutual"

    def start_few_shot(self) -> None:
        """Score few-shot from now on, whatever the memory's size (a worker calls this when
        operators' confirmed normals can calibrate thresholds for it)."""
        self.few_shot_after = 1

    per_camera = True  # frames are scored against their camera's bank (a worker asks this)

    def bank_len(self, stream: Hashable) -> int:
        return len(self.banks.frames(stream))

    def score(self, images: Sequence[np.ndarray],
              streams: Sequence[Hashable] | None = None) -> list[ScoreResult]:
        """Score frames against their stream's bank (or, few-shot, the confirmed normals).
        Frames do not enter the bank here: call :meth:`admit` with those that should (a
        worker leaves out frames that alerted)."""
        if len(images) == 0:
            return []
        streams = list(streams) if streams is not None else [None] * len(images)
        if len(streams) != len(images):
            raise ValueError(f"{len(streams)} stream keys for {len(images)} frames")
        feats = self.features(images)
        if self.mode == "few-shot":
            return [self._few_shot(f, s) for f, s in zip(feats, streams, strict=True)]
        out: list[ScoreResult | None] = [None] * len(images)
        for key in dict.fromkeys(streams):
            idx = [i for i, s in enumerate(streams) if s == key]
            bank = self.banks.frames(key)
            if len(bank) >= self.warmup:
                for i in idx:
                    out[i] = self._result(feats[i], self._patch_scores(feats[i], bank), "mutual", key)
                continue
            for i in idx:  # warm-up: whatever there is, the bank and this call's other frames
                others = bank + [feats[j] for j in idx if j != i]
                if others:
                    out[i] = self._result(feats[i], self._patch_scores(feats[i], others), "warm-up", key)
                else:  # nothing at all to compare with: no evidence either way
                    out[i] = ScoreResult(0.0, np.zeros(feats[i].grid, np.float32),
                                         embedding=feats[i].embedding, mode="warm-up",
                                         stream_state=(key, feats[i]))
        return out  # type: ignore[return-value]

    def admit(self, results: Sequence[ScoreResult]) -> None:
        """Put scored frames into their streams' banks: the caller passes the results of
        :meth:`score` it wants remembered (a worker leaves out frames that alerted). Banks
        hold the newest ``bank_size`` frames; at most ``max_streams`` streams are kept, the
        least recently fed forgotten (stream keys come from outside: cameras)."""
        for r in results:
            if r.stream_state is None:
                raise ValueError("admit() takes results of MutualScorer.score()")
            key, f = r.stream_state  # type: ignore[misc]
            self.banks.add(key, f.stored())

    # -- few-shot: operator-confirmed normals -----------------------------------------------
    def fit(self, normals: Sequence[np.ndarray]) -> None:
        """Start over with ``normals`` as confirmed references (none: pure zero-shot). A
        failure midway leaves the scorer as it was (a learning worker refits while it scores)."""
        before = (self._confirmed, self._memory)
        try:
            self._confirmed, self._memory = 0, None
            self.add_normals(normals)
        except BaseException:
            self._confirmed, self._memory = before
            raise

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        """Add confirmed normals' patches to the memory. With ``memory_tolerance`` > 0 a
        patch is added only where, in some layer, it is farther than that (cosine distance)
        from every patch kept (:func:`inference.scoring.novel_rows`: scores only rise, by a
        bounded amount, and the search stays exact); a line that confirms hundreds of normals
        that repeat each other keeps what is new in them."""
        if len(normals) == 0:
            return
        frames = [f.stored().variants.float() for f in self.features(normals)]
        self._memory = novel_rows(self._memory, frames, self.memory_tolerance)
        self._confirmed += len(normals)

    @property
    def memory_size(self) -> int:
        """Confirmed normals in the memory (frames, not rows: see :attr:`memory_rows`)."""
        return self._confirmed

    @property
    def memory_rows(self) -> int:
        """Patches kept in the memory (per layer)."""
        return 0 if self._memory is None else int(self._memory.shape[1])

    def prepare(self, images: Sequence[np.ndarray], batch_size: int = 8,
                on_batch: Callable[[int], object] | None = None) -> PreparedMutual:
        """Score frames as :meth:`score` does with no stream, keeping their features for
        :meth:`rescore` (operator-confirmed calibration frames are rescored after every
        verdict: without this, each time through the backbone)."""
        feats: list[FrameFeatures] = []
        results: list[ScoreResult] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            got = self.features(chunk)
            results += ([self._few_shot(f, None) for f in got] if self.mode == "few-shot"
                        else self.score(chunk))
            feats += [f.stored() for f in got]
            if on_batch is not None:
                on_batch(len(chunk))
        return PreparedMutual(feats, results)

    def rescore(self, prepared: PreparedMutual) -> list[float] | None:
        """Few-shot scores of prepared frames under the memory as it is now; None in mutual
        mode (those scores depend on the banks: score the frames again)."""
        if self.mode != "few-shot":
            return None
        return [self._few_shot(f, None).score for f in prepared.features]

    def _few_shot(self, f: FrameFeatures, stream: Hashable) -> ScoreResult:
        assert self._memory is not None
        sims = torch.bmm(f.variants.float(), self._memory.transpose(1, 2))  # (V, P, M)
        patch = (1.0 - sims.amax(dim=-1)).clamp_min_(0.0).mean(dim=0)
        return self._result(f, patch, "few-shot", stream)
