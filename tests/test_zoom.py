"""ROI zoom: crop geometry, fusion back into frame coordinates, and with vs without zoom on
real bottle images through `linewatch evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.scoring import ScoreResult
from inference.zoom import ZoomScorer, pick_rois, tiles
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parent.parent


def test_tiles_cover_the_image_at_one_size() -> None:
    image = np.arange(300 * 200 * 3, dtype=np.uint32).reshape(300, 200, 3)
    ts = tiles(image, 0.35)
    assert len({t.shape for t in ts}) == 1 and ts[0].shape[:2] == (105, 70)
    covered = np.zeros((300, 200), bool)
    values = {int(v) for t in ts for v in t[..., 0].ravel()}
    covered.ravel()[[v // 3 for v in values]] = True
    assert covered.all()  # every pixel is in some tile


def test_rois_follow_the_hottest_separated_places_in_frame_pixels() -> None:
    amap = np.zeros((16, 16), np.float32)
    amap[2, 13] = 1.0   # hottest, top right
    amap[3, 12] = 0.9   # same place: must not become the second box
    amap[12, 3] = 0.8   # second, bottom left
    boxes = pick_rois(amap, 2, 0.25, 800, 1200)
    assert len(boxes) == 2
    (x0, y0, x1, y1), (u0, v0, u1, v1) = boxes
    assert (x1 - x0, y1 - y0) == (300, 200)
    assert x0 <= (13.5 / 16) * 1200 <= x1 and y0 <= (2.5 / 16) * 800 <= y1
    assert u0 <= (3.5 / 16) * 1200 <= u1 and v0 <= (12.5 / 16) * 800 <= v1
    assert all(a >= 0 and c <= 1200 and b >= 0 and d <= 800 for a, b, c, d in boxes)  # clamped


class _Constant:
    """A scorer giving every image a constant map: isolates ZoomScorer's fusion arithmetic."""

    name = "const"

    def __init__(self, value: float, grid: int = 8, hot: tuple[int, int] | None = None) -> None:
        self.value, self.grid, self.hot, self.fitted = value, grid, hot, []

    def fit(self, normals):
        self.fitted = list(normals)

    def add_normals(self, normals):
        self.fitted += list(normals)

    def score(self, images):
        out = []
        for _ in images:
            m = np.full((self.grid, self.grid), self.value, np.float32)
            if self.hot:
                m[self.hot] = 1.0
            out.append(ScoreResult(float(m.max()), m))
        return out


def test_crop_maps_are_fused_inside_their_boxes_only() -> None:
    coarse, crop = _Constant(0.2, hot=(1, 6)), _Constant(0.6)
    z = ZoomScorer(coarse, crop, top_k=1, crop_frac=0.25, out_scale=4)
    image = np.zeros((400, 400, 3), np.uint8)
    z.fit([image])
    assert len(crop.fitted) == len(tiles(image, 0.25))  # crop references are reference tiles
    (r,) = z.score([image])
    assert r.anomaly_map.shape == (32, 32) and r.score == 1.0  # the coarse image score stands
    inside = r.anomaly_map > 0.35
    ys, xs = np.nonzero(inside)
    # one 100x100 px box centred on grid cell (1, 6) = frame pixel (x 325, y 75): x 275-375,
    # y 25-125, i.e. output cells 22-29 and 2-9 on the 32x32 grid (0.08 cells per pixel)
    assert inside.sum() == 64
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (2, 9, 22, 29)
    np.testing.assert_allclose(r.anomaly_map[~inside], 0.2, atol=1e-6)


class _Counting(_Constant):
    """A constant-map scorer whose score is the image's mean grey level; counts what it scores."""

    def score(self, images):
        self.scored = getattr(self, "scored", 0) + len(images)
        return [ScoreResult(float(im.mean()) / 255, r.anomaly_map)
                for im, r in zip(images, super().score(images), strict=True)]


def test_cascade_zooms_only_frames_at_the_gate_with_the_same_decisions() -> None:
    """map_gate (the review threshold in a worker): frames below it keep the coarse map and
    cost no crop pass; frames at or above it get exactly the map zooming every frame gives;
    image scores (decisions) are the same either way."""
    frames = [np.full((200, 200, 3), v, np.uint8) for v in (10, 200, 60, 250)]
    runs = {}
    for gate in (None, 0.5):
        coarse, crop = _Counting(0.2, hot=(1, 6)), _Counting(0.6)
        z = ZoomScorer(coarse, crop, top_k=2, crop_frac=0.25, out_scale=4)
        z.fit([frames[0]])
        crop.scored = 0
        z.map_gate = gate
        runs[gate] = (z.score(frames), crop.scored)
    (every, crops_every), (gated, crops_gated) = runs[None], runs[0.5]
    assert crops_every == 8 and crops_gated == 4  # two regions for each of the two bright frames
    assert [r.score for r in gated] == [r.score for r in every]
    for r, e in zip(gated, every, strict=True):
        if r.score >= 0.5:
            assert r.full_map and np.array_equal(r.anomaly_map, e.anomaly_map)
        else:
            assert not r.full_map and r.anomaly_map.shape == (8, 8)  # the coarse map


@pytest.mark.slow
def test_evaluate_with_and_without_zoom_on_small_bottle_breaks(tmp_path: Path) -> None:
    """Bottle broken_small, 1-shot, 1 seed, 224 px: zoom must not cost localisation."""
    data = shared_data("mvtec_ad", "bottle")
    got = {}
    for flag in ("--no-zoom", "--zoom"):
        out = tmp_path / f"{flag}.json"
        r = subprocess.run([sys.executable, "-m", "linewatch", "evaluate", "--data", str(data),
                            "--shots", "1", "--seeds", "1", "--defect-types", "broken_small",
                            "--no-progress", flag, "--json", str(out)],
                           capture_output=True, text=True, cwd=REPO, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        got[flag] = json.loads(out.read_text())
    assert got["--zoom"]["zoom"] is True and got["--no-zoom"]["zoom"] is False
    print({f: (round(g["pixel_auroc"], 4), round(g["pixel_pro"], 4)) for f, g in got.items()})
    assert got["--zoom"]["pixel_auroc"] >= got["--no-zoom"]["pixel_auroc"] - 0.005
    assert got["--zoom"]["pixel_pro"] >= got["--no-zoom"]["pixel_pro"] - 0.01
    assert got["--zoom"]["image_auroc"] == got["--no-zoom"]["image_auroc"]  # same image scores


@pytest.mark.slow
def test_a_worker_scores_frames_with_zoom_on(workers, broker, topics) -> None:
    """`linewatch worker --zoom` starts, scores and routes (the zoom scorer in the real loop)."""
    from tests.conftest import Camera, collect

    w = workers("zoomer", "--zoom", "--image-size", "112")
    w.wait_ready()
    cam = Camera(broker, topics, frames=6, fps=0, camera="cam-z")
    cam.thread.join(timeout=60)
    tally = collect(broker, topics, lambda t: cam.sent <= t.accounted, timeout_s=120).tally
    assert len(tally.scores) == 6 and all(s.scorer == "patch-knn+zoom" for s in tally.scores.values())
