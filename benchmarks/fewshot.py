"""Few-shot techniques, each measured on bottle 1-shot and magnetic tile 4-shot (issue 17).

Every row is the nearest-patch scorer of ``inference.scoring`` with one thing
changed: resolution, reference rotations, photometric and scale views of the
references, per-image luminance normalisation of references and frames alike,
neighbourhood aggregation, a PCA
subspace instead of nearest patch, the mean of k nearest patches, each map less its
median, the frame's own patches beside the references, each patch's brightness
relative to its frame joined to its features, test-time views of each frame (flips,
rotations) averaged, map smoothing, foreground
masking, the image score; and (``--pixel-scale``) frames fed whole at their own shape
at one pixel scale or at each frame's own. The backbone's patch features of each
test set are computed once per resolution (DINOv2-S blocks 5 and 8, what the scorer uses) and every variant
scores from them, so the whole table costs a few backbone passes, not one per
row. Metrics are ``linewatch evaluate``'s (same test sets, same reference draws,
same eval resolution and map upsampling) as mean over the seeds.

``ms/frame`` is the backbone's time per frame at that resolution plus the
variant's own matching time, both measured in this run on this machine's CPU
threads; the backbone part dominates.

What ships is measured end to end by ``linewatch evaluate`` (the README table
shows both): this harness is where techniques are tried before they become
settings, and it keeps the ones that did not pay reproducible.

    python -m benchmarks.fewshot                    # the full table (about 45 min on 2 cores)
    python -m benchmarks.fewshot --quick            # bottle, 224 px, 1 seed, 12 test images
    python -m benchmarks.fewshot --pixel-scale fit,0.5,0.75,1 --datasets magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks._markdown import markdown_table
from inference import eval_metrics as em
from inference.backbones import DinoV2Backbone, resize_batch
from inference.scoring import PatchKNNScorer, _nearest, aggregate_patches, novel_rows
from inference.visualize import upsample_map
from linewatch.evaluate import Split, _eval_shape, load_split, read_mask
from linewatch.images import read_rgb

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"bottle": (DATA / "mvtec_ad" / "bottle", 1), "magnetic_tile": (DATA / "magnetic_tile", 4)}
LAYERS = (5, 8)


@dataclass
class Variant:
    """One row: how references are viewed and how a test frame's features become a score."""

    name: str
    views: tuple = (0,)  # each reference's views: rotation degrees (90 multiples exact, others
    # warped) or a name from PHOTOMETRIC
    aggregate: tuple[int, ...] = (1,)  # r x r neighbourhood means; several: distances averaged
    scorer: str = "knn"  # knn | pca
    smooth: float = 0.0  # Gaussian sigma (in patches) on the map before the image score
    image_score: str = "top1%"  # top1% | max
    foreground: bool = False  # zero background patches for the image score (objects only)
    joint: bool = False  # several r: one nearest patch for the concatenated features (shipped form)
    sizes: tuple[int, ...] = (224,)
    notes: str = ""
    only: tuple[str, ...] = field(default=())  # datasets it applies to (empty: all)
    preprocess: str = ""  # a name from PREPROCESS: applied to every image, references and frames
    k: int = 1  # a patch's distance: the mean over its k nearest reference patches
    minus_median: bool = False  # each map less its own median (a frame's overall distance taken out)
    own_frame: int = 0  # > 0: the lower of the references' distance and the distance to the
    # frame's own patches at least this many patches away (a texture repeats itself)
    brightness: float = 0.0  # > 0: a reference patch must also match the patch's brightness
    # relative to its frame's median: distance + brightness * (difference)^2
    tta: tuple = ()  # test-time views of each frame (rotations, "flip x", "flip y"): each view's
    # map turned back and the maps averaged
    tta_match: str = "same"  # same: a frame's view against the references in that view (what is
    # normal does not change); all: against the references in every view (rotation-invariant)


VARIANTS = [
    Variant("baseline (worker before issue 17)", sizes=(224, 336, 448)),
    Variant("rotate 90 (4 views)", views=(0, 90, 180, 270), sizes=(224, 336, 448)),
    Variant("rotate 45 (8 views)", views=tuple(range(0, 360, 45))),
    Variant("3x3 aggregation", aggregate=(3,), sizes=(224, 448)),
    Variant("multi-scale r=1,3 (mean)", aggregate=(1, 3), sizes=(224, 336, 448)),
    Variant("multi-scale r=1,3 (joint nearest)", aggregate=(1, 3), joint=True, sizes=(224, 336, 448)),
    Variant("multi-scale r=1,3 + rotate 90", aggregate=(1, 3), views=(0, 90, 180, 270), sizes=(448,),
            only=("bottle",)),
    Variant("PCA subspace (99% var)", scorer="pca", sizes=(224, 448)),
    Variant("PCA subspace + rotate 45", scorer="pca", views=tuple(range(0, 360, 45))),
    Variant("smoothing sigma 1 patch", smooth=1.0),
    Variant("references in gamma 0.7, 1.4 (3 views)", views=(0, "gamma 0.7", "gamma 1.4")),
    Variant("references in contrast 0.8, 1.25 (3 views)", views=(0, "contrast 0.8", "contrast 1.25")),
    Variant("references at scale 1.3, 1/1.3 (3 views)", views=(0, "zoom 1.3", "zoom 1/1.3")),
    Variant("references blurred sigma 1 px (2 views)", views=(0, "blur 1")),
    Variant("image score = max patch", image_score="max"),
    Variant("foreground masking", foreground=True, only=("bottle",)),
    Variant("luminance equalised (references and frames)", preprocess="equalise"),
    Variant("luminance CLAHE (references and frames)", preprocess="clahe"),
    Variant("luminance standardised (references and frames)", preprocess="standardise"),
    Variant("mean of 3 nearest reference patches", k=3),
    Variant("map less its median", minus_median=True),
    Variant("lower of references and own frame (4+ patches away)", own_frame=4),
    Variant("patch brightness joined to the features, weight 1", brightness=1.0),
    Variant("patch brightness joined to the features, weight 3", brightness=3.0),
    Variant("test-time views 0, flip x, flip y, 180, each against its references",
            tta=(0, "flip x", "flip y", 180)),
    Variant("test-time views 0, flip x, flip y, 180, against every reference view",
            tta=(0, "flip x", "flip y", 180), tta_match="all"),
    Variant("test-time views 0, 90, 180, 270, each against its references", tta=(0, 90, 180, 270)),
]


def _rotate(image: np.ndarray, deg: int) -> np.ndarray:
    if deg % 90 == 0:
        return np.ascontiguousarray(np.rot90(image, deg // 90))
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _gamma(image: np.ndarray, g: float) -> np.ndarray:
    return np.clip(255.0 * (image / 255.0) ** g, 0, 255).astype(np.uint8)


def _contrast(image: np.ndarray, c: float) -> np.ndarray:
    mean = float(image.mean())
    return np.clip(mean + c * (image.astype(np.float32) - mean), 0, 255).astype(np.uint8)


def _zoom(image: np.ndarray, f: float) -> np.ndarray:
    """The same frame size, the surface seen from f times closer: f > 1 enlarges the centre
    1/f of each side; f < 1 pads the frame by reflection to 1/f of its side and shrinks it back."""
    h, w = image.shape[:2]
    if f >= 1:
        ch, cw = int(h / f), int(w / f)
        y, x = (h - ch) // 2, (w - cw) // 2
        return cv2.resize(image[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    py, px = round(h * (1 / f - 1) / 2), round(w * (1 / f - 1) / 2)
    padded = cv2.copyMakeBorder(image, py, py, px, px, cv2.BORDER_REFLECT)
    return cv2.resize(padded, (w, h), interpolation=cv2.INTER_AREA)


# reference views that model the line's lighting and distance changing (what a texture's
# normal frames vary in), beside rotations
PHOTOMETRIC: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gamma 0.7": lambda im: _gamma(im, 0.7), "gamma 1.4": lambda im: _gamma(im, 1.4),
    "contrast 0.8": lambda im: _contrast(im, 0.8), "contrast 1.25": lambda im: _contrast(im, 1.25),
    "zoom 1.3": lambda im: _zoom(im, 1.3), "zoom 1/1.3": lambda im: _zoom(im, 1 / 1.3),
    "blur 1": lambda im: cv2.GaussianBlur(im, (0, 0), 1.0),
    "flip x": lambda im: np.ascontiguousarray(im[:, ::-1]),
    "flip y": lambda im: np.ascontiguousarray(im[::-1]),
}


def _luminance(image: np.ndarray, how: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = how(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _standardise(lum: np.ndarray) -> np.ndarray:
    f = lum.astype(np.float32)
    return np.clip((f - f.mean()) / (f.std() + 1e-6) * 40.0 + 128.0, 0, 255).astype(np.uint8)


# per-image photometric normalisation of every image (a texture's normal frames differ in
# lighting; taking it out of references and frames alike is the other way to cover it)
PREPROCESS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "": lambda im: im,
    "equalise": lambda im: _luminance(im, cv2.equalizeHist),
    "clahe": lambda im: _luminance(im, cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply),
    "standardise": lambda im: _luminance(im, _standardise),
}


def _view(image: np.ndarray, view: int | str) -> np.ndarray:
    return PHOTOMETRIC[view](image) if isinstance(view, str) else _rotate(image, view)


def _view_back(grid: np.ndarray, view: int | str) -> np.ndarray:
    """A patch map of a frame seen in ``view`` (a rotation by 90s or a flip), turned back."""
    if view == "flip x":
        return grid[:, ::-1]
    if view == "flip y":
        return grid[::-1]
    return np.rot90(grid, -int(view) // 90)


class Features:
    """The scorer's own patch features (``PatchKNNScorer.raw_patch_features``: DINOv2-S blocks
    5+8, each unit norm, concatenated), of squashed frames, kept in float16."""

    def __init__(self, size: int, layers: tuple[int, ...] = LAYERS) -> None:
        self.scorer = PatchKNNScorer(DinoV2Backbone(image_size=size, layers=layers), tiling=False)

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.cat([self.scorer.raw_patch_features(images[i:i + 8]).half()
                          for i in range(0, len(images), 8)])


def _aggregate(f: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``aggregate_patches`` on float16-stored features (renormalised first)."""
    return aggregate_patches(torch.nn.functional.normalize(f, dim=-1), sizes)


def _distances(v: Variant, test: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    b, g, gw, _ = test.shape
    if v.joint:  # what --aggregate does: one feature per patch, every r side by side
        t, m = _aggregate(test, v.aggregate), _aggregate(refs, v.aggregate)
        return _nearest(t.reshape(b, g * gw, -1), m.reshape(-1, t.shape[-1])).reshape(b, g, gw)
    total = torch.zeros(b, g, gw)
    for r in v.aggregate:
        t, m = _aggregate(test, (r,)), _aggregate(refs, (r,))
        d = t.shape[-1]
        if v.scorer == "knn" and v.k > 1:
            dist = _k_nearest(t.reshape(b, g * gw, d), m.reshape(-1, d), v.k)
        elif v.scorer == "knn":
            dist = _nearest(t.reshape(b, g * gw, d), m.reshape(-1, d))
        else:  # SubspaceAD-style: squared residual off the normal patches' principal subspace
            m = m.reshape(-1, d)
            mu = m.mean(0)
            _, s, vt = torch.linalg.svd(m - mu, full_matrices=False)
            k = int(((s ** 2).cumsum(0) / (s ** 2).sum() < 0.99).sum()) + 1
            q = t.reshape(-1, d) - mu
            dist = ((q - (q @ vt[:k].T) @ vt[:k]) ** 2).sum(-1)
        total += dist.reshape(b, g, gw) / len(v.aggregate)
    if v.own_frame:
        total = torch.minimum(total, _own_frame(test, v.own_frame))
    if v.minus_median:
        total = total - total.reshape(b, -1).median(1).values[:, None, None]
    return total


def _relative_brightness(images: list[np.ndarray], size: int) -> torch.Tensor:
    """(B, g, g) each patch's mean grey (0-1) of the squashed frame, less the frame's median
    patch: where a region is lighter or darker than the rest of its frame."""
    grid = size // 14
    sq = resize_batch(images, size).astype(np.float32).mean(-1) / 255.0
    cells = sq.reshape(len(images), grid, 14, grid, 14).mean((2, 4))
    return torch.from_numpy(cells - np.median(cells.reshape(len(images), -1), 1)[:, None, None])


def _with_brightness(test: torch.Tensor, refs: torch.Tensor, bt: torch.Tensor, br: torch.Tensor,
                     weight: float) -> torch.Tensor:
    """(B, g, g) nearest reference patch by cosine distance + weight * brightness difference^2."""
    b, g, gw, d = test.shape
    q, m = test.reshape(-1, d), refs.reshape(-1, d)
    lq, lm = bt.reshape(-1), br.reshape(-1)
    out = torch.empty(q.shape[0])
    for i in range(0, q.shape[0], 4096):
        dist = (1.0 - q[i:i + 4096] @ m.T) + weight * (lq[i:i + 4096, None] - lm[None]) ** 2
        out[i:i + 4096] = dist.min(1).values.clamp_min(0.0)
    return out.reshape(b, g, gw)


def _k_nearest(features: torch.Tensor, memory: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P) mean cosine distance of each patch to its k nearest memory rows."""
    n, p, d = features.shape
    sims = features.reshape(n * p, d) @ memory.T
    return (1.0 - sims.topk(k, dim=1).values).clamp_min(0.0).mean(1).reshape(n, p)


def _own_frame(test: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, g, g') cosine distance of each patch to the nearest patch of its own frame that is
    at least ``radius`` patches away (Chebyshev): a texture's normal grain recurs within the
    frame, a defect does not (unless it is large, which is what this gives up)."""
    b, g, gw, d = test.shape
    yy, xx = torch.meshgrid(torch.arange(g), torch.arange(gw), indexing="ij")
    pos = torch.stack([yy.ravel(), xx.ravel()], 1)
    near = (pos[:, None] - pos[None]).abs().max(-1).values < radius
    t = torch.nn.functional.normalize(test.reshape(b, g * gw, d), dim=-1)
    out = torch.empty(b, g * gw)
    for i in range(b):
        sims = (t[i] @ t[i].T).masked_fill_(near, -2.0)
        out[i] = (1.0 - sims.max(1).values).clamp_min(0.0)
    return out.reshape(b, g, gw)


def _foreground(test: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """(B, g, g) bool: patches on the object, from the references' first principal component
    (AnomalyDINO's masking); the object side is the one the frame centres fall on."""
    d = refs.shape[-1]
    m = refs.reshape(-1, d)
    mu = m.mean(0)
    _, _, vt = torch.linalg.svd(m - mu, full_matrices=False)
    proj = (test - mu) @ vt[0]
    g = test.shape[1]
    c = slice(g // 3, g - g // 3)
    sign = 1.0 if proj[:, c, c].mean() >= 0 else -1.0
    return proj * sign > 0


def _image_scores(v: Variant, maps: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        maps = np.where(mask, maps, 0.0)
    flat = maps.reshape(maps.shape[0], -1)
    if v.image_score == "max":
        return flat.max(1)
    k = max(1, round(0.01 * flat.shape[1]))
    return np.sort(flat, 1)[:, -k:].mean(1)


@dataclass
class Prepared:
    split: Split
    shots: int
    seeds: list[int]
    masks: list[np.ndarray]
    shapes: list[tuple[int, int]]
    labels: np.ndarray
    tests: list[int]


def prepare(name: str, seeds: list[int], limit: int | None) -> Prepared:
    root, shots = SETS[name]
    split = load_split(root)
    idx = list(range(len(split.test)))
    if limit:  # --quick: a seeded mix of normal and defective frames
        rng = np.random.default_rng(0)
        good = [i for i in idx if not split.test[i].defect]
        bad = [i for i in idx if split.test[i].defect]
        idx = sorted(rng.choice(good, limit // 2, replace=False).tolist()
                     + rng.choice(bad, limit - limit // 2, replace=False).tolist())
    shapes, masks = [], []
    for i in idx:
        s = split.test[i]
        h, w = cv2.imread(str(s.path), cv2.IMREAD_GRAYSCALE).shape
        shapes.append(_eval_shape(h, w, 256))
        masks.append(read_mask(s, shapes[-1]))
    labels = np.array([split.test[i].defect for i in idx])
    return Prepared(split, shots, seeds, masks, shapes, labels, idx)


def _quality(p: Prepared, scores: np.ndarray, maps: list[np.ndarray], match_ms: float) -> dict:
    """evaluate's metrics of one draw: image AUROC, pixel AUROC, PRO (and the matching ms)."""
    return {"image_auroc": em.auroc(p.labels, scores),
            "pixel_auroc": em.auroc(np.concatenate([m.ravel() for m in p.masks]),
                                    np.concatenate([m.ravel() for m in maps])),
            "pixel_pro": em.pro_auc(p.masks, maps), "match_ms": match_ms}


def _row(p: Prepared, size: int | str, layers: tuple[int, ...], technique: str, per_seed: list[dict],
         backbone_ms: float) -> dict:
    """One table row: the draws' mean of each metric, ms/frame = backbone + matching."""
    row = {"dataset": p.split.name, "shots": p.shots, "image_size": size, "layers": list(layers),
           "technique": technique, "seeds": p.seeds,
           **{k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}, "backbone_ms": backbone_ms}
    row["ms_per_frame"] = row["backbone_ms"] + row["match_ms"]
    return row


def measure(p: Prepared, size: int, variants: list[Variant], progress: Callable[[str], None],
            layers: tuple[int, ...] = LAYERS) -> list[dict]:
    feats = Features(size, layers)
    images = [read_rgb(p.split.test[i].path) for i in p.tests]
    # the test frames' features per (preprocessing, view): each preprocessing as seen, and the
    # turned views that test-time variants score
    tests, backbone = {}, {}
    for pre, view in dict.fromkeys([(v.preprocess, 0) for v in variants]
                                   + [("", t) for v in variants for t in v.tta]):
        t0 = time.perf_counter()
        tests[(pre, view)] = feats([_view(PREPROCESS[pre](im), view) for im in images]).float()
        backbone[(pre, view)] = 1000 * (time.perf_counter() - t0) / len(images)  # preprocessing included
        progress(f"{p.split.name} {size} px{' ' + pre if pre else ''}{f' view {view}' if view else ''}: "
                 f"backbone {backbone[(pre, view)]:.0f} ms/frame")
    views_needed = list(dict.fromkeys([(v.preprocess, d) for v in variants for d in v.views]
                                      + [("", t) for v in variants for t in v.tta]))
    ref_views, bright = {}, {}
    if any(v.brightness for v in variants):
        bright["test"] = _relative_brightness(images, size)
    for seed in p.seeds:
        refs = [read_rgb(x) for x in p.split.references(p.shots, seed)]
        ref_views[seed] = {(pre, d): feats([_view(PREPROCESS[pre](r), d) for r in refs]).float()
                           for pre, d in views_needed}
        if bright:
            bright[seed] = _relative_brightness(refs, size)
    rows = []
    for v in variants:
        per_seed = []
        test = tests[(v.preprocess, 0)]
        backbone_ms = (sum(backbone[("", t)] for t in v.tta) if v.tta  # a backbone pass per view
                       else backbone[(v.preprocess, 0)])
        for seed in p.seeds:
            refs = torch.cat([ref_views[seed][(v.preprocess, d)] for d in v.views])
            t0 = time.perf_counter()
            if v.tta:
                every = torch.cat([ref_views[seed][("", t)] for t in v.tta])
                dist = np.mean([np.stack([_view_back(m, t) for m in _distances(
                    v, tests[("", t)], ref_views[seed][("", t)] if v.tta_match == "same" else every).numpy()])
                    for t in v.tta], axis=0)
            else:
                dist = (_with_brightness(test, refs, bright["test"], bright[seed], v.brightness)
                        if v.brightness else _distances(v, test, refs)).numpy()
            if v.smooth > 0:
                dist = np.stack([cv2.GaussianBlur(m, (0, 0), v.smooth) for m in dist])
            mask = _foreground(test, refs).numpy() if v.foreground else None
            scores = _image_scores(v, dist, mask)
            match_ms = 1000 * (time.perf_counter() - t0) / len(images)
            maps = [upsample_map(m, w, h, sigma=4.0 * max(h, w) / 256) for m, (h, w) in zip(dist, p.shapes,
                                                                                          strict=True)]
            per_seed.append(_quality(p, scores, maps, match_ms))
        rows.append(row := _row(p, size, layers, v.name if layers == LAYERS
                                else f"blocks {'+'.join(map(str, layers))}", per_seed, backbone_ms))
        progress(f"  {v.name:<36} image {row['image_auroc']:.3f} pixel {row['pixel_auroc']:.3f} "
                 f"PRO {row['pixel_pro']:.3f}  {row['ms_per_frame']:.0f} ms")
    return rows


class WholeFrames:
    """DINOv2-S blocks 5+8 of a frame fed whole, at its own shape, resized by ``factor`` (one
    pixel scale for every frame: references and frames of different sizes see the surface
    at the same scale) or, with ``fit``, so its short side is ``fit`` px (one scale per frame,
    as tiling gives). The position embedding is resampled for each shape (timm's dynamic size)."""

    def __init__(self, factor: float = 0.0, fit: int = 0) -> None:
        import timm
        from safetensors.torch import load_file

        from inference.backbones import IMAGENET_MEAN, IMAGENET_STD, dinov2_weights_path

        self.factor, self.fit = factor, fit
        self.vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518,
                                     dynamic_img_size=True)
        self.vit.load_state_dict(load_file(str(dinov2_weights_path(None))))
        self.vit.eval()
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, im: np.ndarray) -> torch.Tensor:
        """(h/14, w/14, 768) unit-norm features, as ``Features`` gives for a square."""
        h, w = im.shape[:2]
        f = self.fit / min(h, w) if self.fit else self.factor
        hh, ww = max(14, round(h * f / 14) * 14), max(14, round(w * f / 14) * 14)
        x = cv2.resize(im, (ww, hh), interpolation=cv2.INTER_AREA if hh < h else cv2.INTER_CUBIC)
        x = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 - self.mean) / self.std
        vit = self.vit
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        parts = []
        for i, block in enumerate(vit.blocks):
            t = block(t)
            if i in LAYERS:
                parts.append(torch.nn.functional.normalize(t[0, 1:], dim=-1))
            if i >= max(LAYERS):
                break
        return torch.nn.functional.normalize(torch.cat(parts, -1), dim=-1).reshape(hh // 14, ww // 14, -1)


def pixel_scale(p: Prepared, scales: list[str], progress: Callable[[str], None]) -> list[dict]:
    """Rows for frames fed whole at their own shape, not squashed: ``fit`` (short side 224 px,
    each frame its own scale) or a fixed factor (``0.75``: every frame at 3/4 of its pixels),
    the question item 2 of the issue leaves open ("tiles, or an equivalent that keeps the
    pixel scale"). Bottle's frames all have one size, so only the magnetic tiles tell them apart."""
    images = [read_rgb(p.split.test[i].path) for i in p.tests]
    rows = []
    for scale in scales:
        feats = WholeFrames(fit=224) if scale == "fit" else WholeFrames(factor=float(scale))
        t0 = time.perf_counter()
        test = [feats(im) for im in images]
        backbone_ms = 1000 * (time.perf_counter() - t0) / len(images)
        per_seed = []
        for seed in p.seeds:
            memory = torch.cat([feats(read_rgb(x)).reshape(-1, 768)
                                for x in p.split.references(p.shots, seed)])
            t0 = time.perf_counter()
            dist = [_nearest(t.reshape(1, -1, t.shape[-1]), memory).reshape(t.shape[:2]).numpy()
                    for t in test]
            scores = np.array([_image_scores(Variant("whole"), d[None], None)[0] for d in dist])
            match_ms = 1000 * (time.perf_counter() - t0) / len(images)
            maps = [upsample_map(d, w, h, sigma=4.0 * max(h, w) / 256) for d, (h, w) in zip(dist, p.shapes,
                                                                                          strict=True)]
            per_seed.append(_quality(p, scores, maps, match_ms))
        name = "whole frame, short side 224 px" if scale == "fit" else f"whole frame at {scale}x its pixels"
        label = "short side 224" if scale == "fit" else f"{scale}x"  # not a square model size
        rows.append(row := _row(p, label, LAYERS, name, per_seed, backbone_ms))
        progress(f"  {name:<36} image {row['image_auroc']:.3f} pixel {row['pixel_auroc']:.3f} "
                 f"PRO {row['pixel_pro']:.3f}  {row['ms_per_frame']:.0f} ms")
    return rows


def knn_scaling(frames_in_memory: tuple[int, ...] = (1, 4, 16, 64, 204), repeats: int = 3) -> list[dict]:
    """ms per frame of the scorer's exact nearest-patch search (``inference.scoring._nearest``)
    against memories of n frames' patches (224 px: 256 patches of 768 values each), beside
    the backbone's time. 204 = the default worker's bound: 4 references + 200 learned normals."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(8, 256, 768, generator=gen), dim=-1)
    out = []
    for n in frames_in_memory:
        memory = torch.nn.functional.normalize(torch.randn(n * 256, 768, generator=gen), dim=-1)
        _nearest(queries, memory)  # warm
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _nearest(queries, memory)
            times.append(1000 * (time.perf_counter() - t0) / len(queries))
        out.append({"frames_in_memory": n, "memory_rows": n * 256, "ms_per_frame": float(np.median(times))})
    return out


def memory_growth(name: str, seed: int, learned: tuple[int, ...], tolerances: tuple[float, ...],
                  progress: Callable[[str], None]) -> list[dict]:
    """A line that learns: the references of draw ``seed`` plus n normals an operator
    confirmed (drawn from the rest of the normal pool), the memory built as the scorer builds
    it (``novel_rows``, frame by frame) at each ``--memory-tolerance``; its rows, the exact
    nearest-patch ms per frame against it, and the test set's quality. 224 px, squashed."""
    p = prepare(name, [seed], None)
    feats = Features(224)
    test = feats([read_rgb(p.split.test[i].path) for i in p.tests]).float()
    refs = p.split.references(p.shots, seed)
    pool = [c for c in p.split.candidates if c not in refs]
    order = np.random.default_rng(100 + seed).permutation(len(pool))[:max(learned)]
    normals = feats([read_rgb(x) for x in refs + [pool[i] for i in order]]).float()
    frames = [f.reshape(-1, f.shape[-1]) for f in normals]
    b, g, gw, d = test.shape
    pix_true = np.concatenate([m.ravel() for m in p.masks])
    rows = []
    for n in learned:
        for tol in tolerances:
            t0 = time.perf_counter()
            memory = novel_rows(None, frames[:p.shots + n], tol)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dist = _nearest(test.reshape(b, g * gw, d), memory).reshape(b, g, gw).numpy()
            match_ms = 1000 * (time.perf_counter() - t0) / b
            scores = _image_scores(Variant("memory"), dist, None)
            maps = [upsample_map(m, w, h, sigma=4.0 * max(h, w) / 256) for m, (h, w) in zip(dist, p.shapes,
                                                                                          strict=True)]
            row = {"dataset": name, "shots": p.shots, "seed": seed, "learned": n, "tolerance": tol,
                   "memory_rows": int(memory.shape[0]), "match_ms": match_ms, "build_s": build_s,
                   "image_auroc": em.auroc(p.labels, scores),
                   "pixel_auroc": em.auroc(pix_true, np.concatenate([m.ravel() for m in maps])),
                   "pixel_pro": em.pro_auc(p.masks, maps)}
            rows.append(row)
            progress(f"  {name} +{n} learned, tolerance {tol}: {row['memory_rows']} rows, "
                     f"{match_ms:.1f} ms, image {row['image_auroc']:.3f} pixel {row['pixel_auroc']:.3f} "
                     f"PRO {row['pixel_pro']:.3f}")
    return rows


def memory_table(rows: list[dict]) -> str:
    return markdown_table(
        ["data", "learned normals", "--memory-tolerance", "memory rows", "nearest-patch ms/frame",
         "image AUROC", "pixel AUROC", "PRO"],
        [[f"{r['dataset']} {r['shots']}-shot", r["learned"], f"{r['tolerance']:g}", r["memory_rows"],
          f"{r['match_ms']:.1f}", f"{r['image_auroc']:.3f}", f"{r['pixel_auroc']:.3f}",
          f"{r['pixel_pro']:.3f}"] for r in rows])


def table(rows: list[dict]) -> str:
    out = ["| data | technique | px | image AUROC | pixel AUROC | PRO | ms/frame |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} {r['shots']}-shot | {r['technique']} | {r['image_size']} | "
                   f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pixel_pro']:.3f} | "
                   f"{r['ms_per_frame']:.0f} |")
    return "\n".join(out)


def _write(path: Path, result: dict, say: bool = True) -> None:
    """Write ``result`` (with the torch threads it was measured with) as JSON to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"torch_threads": torch.get_num_threads(), **result}, indent=2))
    if say:
        print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fewshot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bottle, 224 px, seed 0, 12 test frames")
    ap.add_argument("--datasets", default="bottle,magnetic_tile")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default=None, help="only these resolutions, e.g. 224,336 (default: all)")
    ap.add_argument("--only", default=None, metavar="WORDS",
                    help="only the rows whose technique contains one of these comma-separated "
                         "words (and the baseline), e.g. gamma,contrast")
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--blocks", default=None, metavar="SETS",
                    help="only the baseline, once per set of DINOv2 blocks compared, e.g. "
                         "5+8,4+7,3+6,5 (224 px, all seeds); written to benchmarks/results/blocks.json")
    ap.add_argument("--memory", action="store_true",
                    help="only the learning-line table: memory rows, ms and quality as operators "
                         "confirm 16/64/200 normals, at each --memory-tolerance (seed 0; about "
                         "15 min on 2 cores); written to benchmarks/results/memory.json")
    ap.add_argument("--pixel-scale", default=None, metavar="SCALES",
                    help="only frames fed whole at their own shape instead of squashed: 'fit' "
                         "(short side 224 px) and/or fixed factors, e.g. fit,0.5,0.75,1 (3 seeds); "
                         "written to benchmarks/results/pixel_scale.json")
    ap.add_argument("--json", default=None,
                    help="where to write the rows (default: benchmarks/results/fewshot.json; "
                         "none with --quick)")
    a = ap.parse_args(argv)
    if sum(bool(x) for x in (a.only, a.memory, a.blocks, a.pixel_scale)) > 1:
        ap.error("--only, --memory, --blocks and --pixel-scale each pick a different table: one at a time")
    if a.only and not a.json and not a.quick:
        ap.error("--only needs --json: a partial table would replace benchmarks/results/fewshot.json")
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    names = ["bottle"] if a.quick else [n.strip() for n in a.datasets.split(",")]
    for n in names:
        if n not in SETS:
            ap.error(f"--datasets: unknown {n!r}; choose from {', '.join(SETS)}")
        if not SETS[n][0].is_dir():
            ap.error(f"{SETS[n][0]} is missing: the benchmark reads ../shared/data beside the repository")
    if a.memory:
        mem = [r for n in names for r in memory_growth(
            n, 0, (0, 16, 64, 200), (0.0, 0.02, 0.05, 0.1),
            lambda m: print(m, file=sys.stderr, flush=True))]
        print(memory_table(mem))
        _write(Path(a.json or "benchmarks/results/memory.json"), {"rows": mem})
        return 0
    seeds = [0] if a.quick else list(range(a.seeds))
    if a.pixel_scale:
        if a.quick or a.sizes:
            ap.error("--pixel-scale feeds every test frame whole at its own scale: --quick and "
                     "--sizes do not apply")
        scales = [x.strip() for x in a.pixel_scale.split(",")]
        for x in scales:
            if x != "fit":
                try:
                    if float(x) <= 0:
                        raise ValueError
                except ValueError:
                    ap.error(f"--pixel-scale: {x!r} is neither 'fit' nor a positive factor")
        rows = [r for n in names for r in pixel_scale(
            prepare(n, seeds, None), scales, lambda m: print(m, file=sys.stderr, flush=True))]
        print(table(rows))
        _write(Path(a.json or "benchmarks/results/pixel_scale.json"), {"rows": rows})
        return 0
    if a.blocks:
        sets = [tuple(int(b) for b in x.split("+")) for x in a.blocks.split(",")]
        rows = []
        for n in names:
            p = prepare(n, seeds, None)
            for layers in sets:
                rows += measure(p, 224, [VARIANTS[0]], lambda m: print(m, file=sys.stderr, flush=True),
                                layers=layers)
        print(table(rows))
        _write(Path(a.json or "benchmarks/results/blocks.json"), {"rows": rows})
        return 0
    sizes = sorted({s for v in VARIANTS for s in v.sizes})
    if a.quick:
        sizes = [224]
    elif a.sizes:
        sizes = [int(x) for x in a.sizes.split(",")]
    out = None if a.json is None and a.quick else Path(a.json or "benchmarks/results/fewshot.json")
    result: dict = {"torch_threads": torch.get_num_threads(), "rows": [], "knn": []}

    def save() -> None:  # after every block: a long run stopped part-way keeps what it measured
        if out is not None:
            _write(out, result, say=False)

    for n in names:
        p = prepare(n, seeds, 12 if a.quick else None)
        for size in sizes:
            vs = [v for v in VARIANTS if size in v.sizes and (not v.only or n in v.only)]
            if a.only:
                words = [w.strip() for w in a.only.split(",")]
                vs = [v for v in vs if v is VARIANTS[0] or any(w in v.name for w in words)]
            if a.quick:
                vs = vs[:3]
            result["rows"] += measure(p, size, vs, lambda m: print(m, file=sys.stderr, flush=True))
            save()
    print(table(result["rows"]))
    result["knn"] = knn_scaling((1, 16) if a.quick else (1, 4, 16, 64, 204))
    print("\n| frames in memory | memory rows | exact nearest-patch ms/frame |\n|---|---|---|")
    for k in result["knn"]:
        print(f"| {k['frames_in_memory']} | {k['memory_rows']} | {k['ms_per_frame']:.1f} |")
    save()
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
