"""Attention-guided ROI zoom (after ATAC-Net): look again, closer, where the map is hot.

A 900-2000 px frame shrunk to a 224 px model input leaves each model patch
covering 60-130 frame pixels, so a small defect is one patch among hundreds and
its signal is averaged away. The zoom pass:

1. scores the whole frame (the coarse map);
2. takes the ``top_k`` hottest places of that map, far enough apart;
3. crops a box of ``crop_frac`` of the frame around each, **from the full-
   resolution frame**, and scores the crop at model resolution - against
   crop-level references (the reference images cut into overlapping tiles of
   the same size, so crops are compared with normal crops at the same scale);
4. fuses each crop map back into frame coordinates on a finer output grid,
   averaging it with the coarse map there (outside the crops the coarse map
   stands).

The image score stays the coarse pass's: zoom sharpens *where*, and is measured
by pixel AUROC and PRO (``linewatch evaluate --zoom`` / ``--no-zoom``).

The cascade: with ``map_gate`` set (a worker sets it to its review threshold, as
for WinCLIP's lazy maps), only frames whose coarse score reaches the gate are
zoomed; the rest keep the coarse map, marked ``full_map=False``. Since the image
score is the coarse one, every decision is the same as zooming every frame, and
the frames a person looks at (review, alert) carry the zoomed map; on a stream
with few defects the zoom then costs about its share of reviewed frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from inference.scoring import ScoreResult


def tiles(image: np.ndarray, crop_frac: float) -> list[np.ndarray]:
    """Overlapping crops (half-crop stride) of ``crop_frac`` of each side, covering the image."""
    h, w = image.shape[:2]
    ch, cw = max(8, round(h * crop_frac)), max(8, round(w * crop_frac))
    ys = np.unique(np.linspace(0, h - ch, max(2, round((h - ch) / (ch / 2)) + 1)).round().astype(int))
    xs = np.unique(np.linspace(0, w - cw, max(2, round((w - cw) / (cw / 2)) + 1)).round().astype(int))
    return [np.ascontiguousarray(image[y:y + ch, x:x + cw]) for y in ys for x in xs]


def pick_rois(amap: np.ndarray, top_k: int, crop_frac: float, height: int, width: int
              ) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) in frame pixels around the ``top_k`` separated maxima of ``amap``."""
    gh, gw = amap.shape
    ch, cw = max(8, round(height * crop_frac)), max(8, round(width * crop_frac))
    work = amap.astype(np.float64).copy()
    boxes = []
    for _ in range(top_k):
        r, c = np.unravel_index(int(np.argmax(work)), work.shape)
        if not np.isfinite(work[r, c]):
            break
        cy, cx = (r + 0.5) * height / gh, (c + 0.5) * width / gw
        y0 = int(np.clip(round(cy - ch / 2), 0, height - ch))
        x0 = int(np.clip(round(cx - cw / 2), 0, width - cw))
        boxes.append((x0, y0, x0 + cw, y0 + ch))
        # suppress this box's footprint on the grid so the next pick is somewhere else
        r0, r1 = int(y0 * gh / height), int(np.ceil((y0 + ch) * gh / height))
        c0, c1 = int(x0 * gw / width), int(np.ceil((x0 + cw) * gw / width))
        work[r0:r1, c0:c1] = -np.inf
    return boxes


class ZoomScorer:
    """A coarse scorer plus a crop scorer (usually sharing one backbone); see the module doc."""

    def __init__(self, coarse, crop, top_k: int = 2, crop_frac: float = 0.35, out_scale: int = 4) -> None:
        if not 0.05 <= crop_frac <= 0.9:
            raise ValueError(f"crop_frac must be within [0.05, 0.9], got {crop_frac}")
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.coarse, self.crop = coarse, crop
        self.top_k, self.crop_frac, self.out_scale = top_k, crop_frac, out_scale
        self.name = f"{coarse.name}+zoom"
        self.map_gate: float | None = None  # zoom only frames whose coarse score reaches it

    def fit(self, normals: Sequence[np.ndarray]) -> None:
        self.coarse.fit(normals)
        self.crop.fit([t for im in normals for t in tiles(im, self.crop_frac)])

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        self.coarse.add_normals(normals)
        self.crop.add_normals([t for im in normals for t in tiles(im, self.crop_frac)])

    def score(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        coarse = self.coarse.score(images)
        gate = self.map_gate
        boxes = [pick_rois(r.anomaly_map, self.top_k, self.crop_frac, im.shape[0], im.shape[1])
                 if gate is None or r.score >= gate else []
                 for im, r in zip(images, coarse, strict=True)]
        crops = [im[y0:y1, x0:x1] for im, bs in zip(images, boxes, strict=True) for x0, y0, x1, y1 in bs]
        crop_results = iter(self.crop.score(crops)) if crops else iter(())
        out = []
        for im, r, bs in zip(images, coarse, boxes, strict=True):
            if not bs:  # below the gate: the coarse result, as it is
                out.append(ScoreResult(score=r.score, anomaly_map=r.anomaly_map, full_map=False,
                                       embedding=r.embedding))
                continue
            h, w = im.shape[:2]
            gh, gw = r.anomaly_map.shape
            oh, ow = gh * self.out_scale, gw * self.out_scale
            fused = cv2.resize(r.anomaly_map.astype(np.float32), (ow, oh), interpolation=cv2.INTER_LINEAR)
            for x0, y0, x1, y1 in bs:
                cm = next(crop_results).anomaly_map
                r0, r1 = round(y0 * oh / h), max(round(y0 * oh / h) + 1, round(y1 * oh / h))
                c0, c1 = round(x0 * ow / w), max(round(x0 * ow / w) + 1, round(x1 * ow / w))
                zoomed = cv2.resize(cm.astype(np.float32), (c1 - c0, r1 - r0), interpolation=cv2.INTER_LINEAR)
                fused[r0:r1, c0:c1] = 0.5 * (fused[r0:r1, c0:c1] + zoomed)
            out.append(ScoreResult(score=r.score, anomaly_map=fused, full_map=r.full_map,
                                   embedding=r.embedding))
        return out
