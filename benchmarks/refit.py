"""A learning worker's refit: what evicting its oldest learned normals costs, from images or from kept rows.

A worker that learns from operators' verdicts keeps at most ``--max-learned-normals``
(200) frames; past that it evicts the oldest and refits its memory. The refit ran the
backbone on every learned frame again, on the worker's own thread, so frames waited. The
worker now keeps each learned frame's memory rows (float16) and refits from them
(``PatchKNNScorer.fit_views``): only the novelty filter runs.

Measured here with the worker's default scorer (patch-knn, DINOv2-S 224 px,
``--memory-tolerance`` 0.02), the references of the issue-17 protocol (bottle 1, magnetic
tile 4, draw 0) and the next 200 normal images as the learned frames, both refits on the
same frames in one run: seconds, the rows kept, and how far the two memories' scores of the
test set lie apart (float16 rows). Also what stays per verdict: the backbone on the new
frames (ms a frame) and the kept rows' bytes.

    python -m benchmarks.refit        # writes benchmarks/results/refit.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._markdown import markdown_table, save_rows

RESULTS = Path(__file__).resolve().parent / "results" / "refit.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHOTS = {"bottle": 1, "magnetic_tile": 4}


def measure(name: str, learned: int, test_frames: int) -> dict:
    import inference
    from linewatch.evaluate import load_split
    from linewatch.images import read_rgb

    root = DATA / "mvtec_ad" / "bottle" if name == "bottle" else DATA / "magnetic_tile"
    split = load_split(root)
    pool = split.references(SHOTS[name] + learned, 0)
    refs = [read_rgb(p) for p in pool[:SHOTS[name]]]
    frames = [read_rgb(p) for p in pool[SHOTS[name]:]]
    rng = np.random.default_rng(0)
    test = [read_rgb(split.test[i].path) for i in rng.choice(len(split.test), test_frames, replace=False)]
    settings = inference.ScorerSettings()
    with torch.no_grad():
        from_images = settings.build()
        t0 = time.perf_counter()
        from_images.fit(refs + frames)
        images_s = time.perf_counter() - t0
        from_rows = settings.build()
        from_rows.backbone = from_images.backbone  # one model in memory
        t0 = time.perf_counter()
        rows = [[v.to(torch.float16) for v in views] for views in from_rows.memory_views(refs + frames)]
        views_ms = 1000 * (time.perf_counter() - t0) / len(refs + frames)
        t0 = time.perf_counter()
        from_rows.fit_views([v for views in rows for v in views])
        rows_s = time.perf_counter() - t0
        a = np.array([r.score for r in from_images.score(test)])
        b = np.array([r.score for r in from_rows.score(test)])
    kept = sum(v.numel() * v.element_size() for views in rows for v in views)
    return {"dataset": name, "references": len(refs), "learned": len(frames),
            "refit_from_images_s": images_s, "refit_from_rows_s": rows_s,
            "memory_rows_from_images": from_images.memory_size,
            "memory_rows_from_rows": from_rows.memory_size,
            "test_frames": len(test), "max_score_difference": float(np.abs(a - b).max()),
            "backbone_ms_per_new_frame": views_ms, "kept_rows_mb": kept / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.refit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learned", type=int, default=200, help="learned frames (default: %(default)s)")
    ap.add_argument("--test-frames", type=int, default=40,
                    help="test frames whose scores compare the two memories (default: %(default)s)")
    ap.add_argument("--datasets", default="bottle,magnetic_tile", help="default: %(default)s")
    ap.add_argument("--json", default=str(RESULTS))
    a = ap.parse_args(argv)
    unknown = set(a.datasets.split(",")) - set(SHOTS)
    if unknown:
        ap.error(f"--datasets: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SHOTS)}")
    rows = []
    for name in a.datasets.split(","):
        rows.append(measure(name, a.learned, a.test_frames))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown_table(
        ["data", "references + learned", "refit from images (s)", "refit from kept rows (s)", "ratio",
         "memory rows (images / rows)", "max score difference", "backbone ms per new frame", "kept rows MB"],
        [[r["dataset"], f"{r['references']} + {r['learned']}", f"{r['refit_from_images_s']:.1f}",
          f"{r['refit_from_rows_s']:.2f}", f"{r['refit_from_images_s'] / r['refit_from_rows_s']:.0f}x",
          f"{r['memory_rows_from_images']} / {r['memory_rows_from_rows']}",
          f"{r['max_score_difference']:.1e}",
          f"{r['backbone_ms_per_new_frame']:.0f}", f"{r['kept_rows_mb']:.0f}"] for r in rows]))
    print(f"json: {save_rows(a.json, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
