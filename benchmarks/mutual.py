"""Zero-shot mutual scoring: what a frame costs against its bank, and how small the bank can be.

Two measurements, one run:

* **speed**: ms per frame of :class:`inference.mutual.MutualScorer` scoring a frame against
  a bank of B frames (B = 16, 64, 256), beside :class:`inference.scoring.PatchKNNScorer`
  scoring the same frames against B reference frames, and the backbone alone. Real bottle
  photos (224 px, one tile: 256 patches per frame), one frame per call as a paced camera
  delivers them, the median of the query frames.
* **bank size**: magnetic tile, zero-shot stream protocol (``linewatch.evaluate.
  evaluate_stream``: MT_Free with 5% defects, each frame against the frames before it), for
  several bank sizes; image / pixel AUROC and PRO.
* **few-shot memory** (``--memory``): a line whose operators confirmed N normals scores
  few-shot against them; the memory's novelty filter (``--memory-tolerance``) at several
  tolerances: rows kept, ms of matching a frame, and the test set's quality (``linewatch
  evaluate``'s metrics), bottle and magnetic tile, draw 0 of the normal pool.

    python -m benchmarks.mutual                 # speed and bank size, writes benchmarks/results/mutual.json
    python -m benchmarks.mutual --quick         # speed only, B = 4 and 16, 3 query frames
    python -m benchmarks.mutual --memory        # the few-shot memory, writes .../mutual_memory.json

Ratios are within this run: same machine, same frames.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._markdown import markdown_table

RESULTS = Path(__file__).resolve().parent / "results" / "mutual.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _bottle_frames(n: int) -> list[np.ndarray]:
    from linewatch.images import read_rgb

    root = DATA / "mvtec_ad" / "bottle"
    paths = sorted((root / "train" / "good").glob("*.png")) + sorted((root / "test").glob("*/*.png"))
    if len(paths) < n:
        raise SystemExit(f"{root}: {len(paths)} photos, {n} needed")
    return [read_rgb(p) for p in paths[:n]]


def _ms(fn, queries: list[np.ndarray]) -> float:
    fn(queries[:1])  # warm
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn([q])
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def speed(banks: tuple[int, ...], n_queries: int) -> list[dict]:
    from inference.backbones import DinoV2Backbone
    from inference.mutual import MutualScorer
    from inference.scoring import PatchKNNScorer

    backbone = DinoV2Backbone()
    frames = _bottle_frames(max(banks) + n_queries)
    queries, pool = frames[:n_queries], frames[n_queries:]
    knn = PatchKNNScorer(backbone)
    rows = []
    with torch.no_grad():
        alone = _ms(knn.raw_patch_features, queries)
        for b in banks:
            mutual = MutualScorer(backbone, bank_size=b, warmup=min(b, 8))
            feats = [f for i in range(0, b, 16) for f in mutual.features(pool[i:min(b, i + 16)])]
            for f in feats:  # a full bank, without scoring its way there
                mutual.banks.add("cam", f)
            assert mutual.bank_len("cam") == b
            m = _ms(lambda x: mutual.score(x, ["cam"]), queries)  # noqa: B023 - used at once
            knn.fit(pool[:b])
            k = _ms(knn.score, queries)
            rows.append({"bank_frames": b, "mutual_ms_per_frame": m, "patch_knn_ms_per_frame": k,
                         "backbone_ms_per_frame": alone, "mutual_over_patch_knn": m / k})
            print(f"bank {b:>4}: mutual {m:7.1f} ms  patch-knn {k:7.1f} ms  (backbone {alone:.1f} ms)",
                  flush=True)
    return rows


def bank_sizes(banks: tuple[int, ...], seeds: int) -> list[dict]:
    from inference.backbones import DinoV2Backbone
    from inference.mutual import MutualScorer
    from linewatch.evaluate import describe_stream, evaluate_stream, load_split, stream_frames

    split = load_split(DATA / "magnetic_tile")
    print("magnetic tile stream:", describe_stream(stream_frames(split)), flush=True)
    backbone = DinoV2Backbone()
    rows = []
    for b in banks:
        runs = []
        for seed in range(seeds):
            with torch.no_grad():
                run, _ = evaluate_stream(MutualScorer(backbone, bank_size=b, warmup=min(b, 8)), split,
                                         seed, progress=False)
            runs.append(run)
        row = {"bank_frames": b, "seeds": seeds,
               **{k: float(np.mean([r.metrics[k] for r in runs]))
                  for k in ("image_auroc", "pixel_auroc", "pixel_pro")},
               "ms_per_frame": float(np.mean([r.ms_per_image for r in runs]))}
        rows.append(row)
        print(f"bank {b:>4}: image {row['image_auroc']:.3f} pixel {row['pixel_auroc']:.3f} "
              f"PRO {row['pixel_pro']:.3f} ({row['ms_per_frame']:.0f} ms/frame)", flush=True)
    return rows


def few_shot_memory(datasets: tuple[str, ...], learned: int, tolerances: tuple[float, ...]) -> list[dict]:
    """Few-shot scoring of each test set against ``learned`` confirmed normals, memory built
    at each tolerance; the test frames' features are computed once and matched per row."""
    from inference.backbones import DinoV2Backbone
    from inference.mutual import MutualScorer
    from linewatch.evaluate import _seed_run, load_split
    from linewatch.images import read_rgb

    backbone = DinoV2Backbone()
    roots = {"bottle": DATA / "mvtec_ad" / "bottle", "magnetic_tile": DATA / "magnetic_tile"}
    rows = []
    for name in datasets:
        split = load_split(roots[name])
        probe = MutualScorer(backbone)
        images = [read_rgb(s.path) for s in split.test]
        with torch.no_grad():
            test = [f for i in range(0, len(images), 8) for f in probe.features(images[i:i + 8])]
            normals = [read_rgb(p) for p in split.references(learned, 0)]
            for tol in tolerances:
                scorer = MutualScorer(backbone, memory_tolerance=tol)
                t0 = time.perf_counter()
                scorer.fit(normals)
                build_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                results = [scorer._few_shot(f, None) for f in test]  # the matching alone
                match = time.perf_counter() - t0
                run = _seed_run(0, [], split.test, results, [im.shape[:2] for im in images], match, 256)
                row = {"dataset": name, "learned": learned, "memory_tolerance": tol,
                       "memory_rows": scorer.memory_rows, "match_ms": 1000 * match / len(test),
                       "fit_s": build_s, **{k: run.metrics[k] for k in ("image_auroc", "pixel_auroc",
                                                                        "pixel_pro")}}
                rows.append(row)
                print(f"{name} {learned} confirmed, tolerance {tol:g}: {row['memory_rows']} rows, "
                      f"{row['match_ms']:.1f} ms; image {row['image_auroc']:.3f} pixel "
                      f"{row['pixel_auroc']:.3f} PRO {row['pixel_pro']:.3f}", flush=True)
    return rows


def memory_table(rows: list[dict]) -> str:
    return markdown_table(
        ["data", "confirmed normals", "--memory-tolerance", "memory rows (per layer)", "matching ms/frame",
         "image AUROC", "pixel AUROC", "PRO"],
        [[r["dataset"], r["learned"], f"{r['memory_tolerance']:g}", r["memory_rows"], f"{r['match_ms']:.1f}",
          f"{r['image_auroc']:.3f}", f"{r['pixel_auroc']:.3f}", f"{r['pixel_pro']:.3f}"] for r in rows])


def table(result: dict) -> str:
    out = ["| bank frames | mutual ms/frame | patch-knn ms/frame (same frames as references) | "
           "ratio | backbone alone |", "|---|---|---|---|---|"]
    for r in result["speed"]:
        out.append(f"| {r['bank_frames']} | {r['mutual_ms_per_frame']:.0f} | "
                   f"{r['patch_knn_ms_per_frame']:.0f} | {r['mutual_over_patch_knn']:.2f} | "
                   f"{r['backbone_ms_per_frame']:.0f} |")
    if result.get("bank_sizes"):
        out += ["", "| bank frames | image AUROC | pixel AUROC | PRO | ms/frame |", "|---|---|---|---|---|"]
        for r in result["bank_sizes"]:
            out.append(f"| {r['bank_frames']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
                       f"{r['pixel_pro']:.3f} | {r['ms_per_frame']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mutual", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="speed only: banks 4 and 16, 3 query frames")
    ap.add_argument("--banks", default="16,64,256", help="bank sizes for speed (default: %(default)s)")
    ap.add_argument("--quality-banks", default="8,16,32,64",
                    help="bank sizes for magnetic-tile quality, '' for none (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="stream orders per bank size (default: %(default)s)")
    ap.add_argument("--memory", action="store_true",
                    help="only the few-shot memory's novelty filter (see above)")
    ap.add_argument("--learned", type=int, default=64,
                    help="with --memory: confirmed normals in the memory (default: %(default)s)")
    ap.add_argument("--tolerances", default="0,0.02,0.05",
                    help="with --memory: --memory-tolerance values (default: %(default)s)")
    ap.add_argument("--datasets", default="bottle,magnetic_tile",
                    help="with --memory: bottle, magnetic_tile (default: %(default)s)")
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--json", default=None, help=f"default: {RESULTS} (none with --quick)")
    a = ap.parse_args(argv)
    defaults = ap.parse_args([])
    memory_only = ("learned", "tolerances", "datasets")
    given = [k for k in ("quick", "banks", "quality_banks", "seeds", *memory_only)
             if getattr(a, k) != getattr(defaults, k)]
    wrong = [k for k in given if (k in memory_only) != a.memory]
    if wrong:
        ap.error(f"--{wrong[0].replace('_', '-')} " + ("is not used by --memory" if a.memory
                                                       else "sets the --memory table: add --memory"))
    unknown = set(a.datasets.split(",")) - {"bottle", "magnetic_tile"}
    if unknown:
        ap.error(f"--datasets: unknown {', '.join(sorted(unknown))}; choose from bottle, magnetic_tile")
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    if a.memory:
        rows = few_shot_memory(tuple(a.datasets.split(",")), a.learned,
                               tuple(float(x) for x in a.tolerances.split(",")))
        print(memory_table(rows))
        path = Path(a.json) if a.json else RESULTS.with_name("mutual_memory.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "torch_threads": torch.get_num_threads()}, indent=2) + "\n")
        print(f"json: {path}")
        return 0
    if a.quick:
        result = {"speed": speed((4, 16), 3), "bank_sizes": []}
    else:
        result = {"speed": speed(tuple(int(x) for x in a.banks.split(",")), 16), "bank_sizes": []}
        if a.quality_banks:
            result["bank_sizes"] = bank_sizes(tuple(int(x) for x in a.quality_banks.split(",")), a.seeds)
    result["torch_threads"] = torch.get_num_threads()
    print(table(result))
    path = Path(a.json) if a.json else (None if a.quick else RESULTS)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"json: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
