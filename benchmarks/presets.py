"""ms per frame of the worker's scorer at its defaults, at ``--preset quality`` and at other
settings a GPU can afford, on this machine's CPU or on a GPU (``--device cuda``): issue 17's
"defaults for 2 CPU cores, a documented quality preset for GPUs", measured on both.

Frames are real photos: MVTec AD bottle (square, 900 px; 1 reference) and magnetic tile
(crops of 103-632 px, the long ones cut into tiles; 4 references). Each batch size is timed
on the scorer's own call (``scorer.score``: preprocessing, backbone, matching, maps back on
the CPU as a worker gets them; decoding excluded), the median of ``--repeats`` passes after
a warm-up, the device synchronised. Quality does not depend on the device (the same
arithmetic): it is in the README's tables. ``--check`` scores one batch on the device and on
the CPU and reports the largest difference, so a GPU's figures are known to be of the same
scorer.

    python -m benchmarks.presets                              # this machine's CPU, batch 8
    python -m benchmarks.presets --device cuda --batch-sizes 8,32 --check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._markdown import markdown_table, save_rows
from inference.settings import PRESETS, ScorerSettings
from linewatch.images import read_rgb

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETTINGS: dict[str, dict] = {
    "defaults (224 px)": {},
    "--preset quality (336 px)": dict(PRESETS["quality"]),
    "448 px": {"image_size": 448},
    "--preset quality --reference-augment rotate": {**PRESETS["quality"], "reference_augment": "rotate"},
    "--test-views flips (224 px)": {"test_views": "flips"},
}


def frames(data: Path, name: str, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(references, frames) of a dataset: bottle 1 reference and its first ``n`` test photos;
    magnetic tile 4 defect-free references and ``n`` photos taken in turn from each folder
    (so the long crops that are cut into tiles come in their share)."""
    if name == "bottle":
        root = data / "mvtec_ad" / "bottle"
        refs = sorted((root / "train" / "good").glob("*.png"))[:1]
        test = sorted((root / "test").glob("*/*.png"))[:n]
    else:
        root = data / "magnetic_tile"
        refs = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))[:4]
        folders = [sorted(d.glob("Imgs/*.jpg"))[4:] for d in sorted(root.glob("MT_*"))]
        test = [f for group in zip(*folders, strict=False) for f in group][:n]
    if not refs or len(test) < n:
        raise SystemExit(f"{root}: needs its references and {n} test photos (found {len(test)})")
    return [read_rgb(p) for p in refs], [read_rgb(p) for p in test]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_scorer(scorer, images: list[np.ndarray], batch: int, repeats: int, device: str) -> float:
    """Median ms per frame of ``scorer.score`` on batches of ``batch`` (the frames repeated to
    fill a batch), after one warm-up pass."""
    work = (images * (batch // len(images) + 1))[:batch]
    scorer.score(work)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        scorer.score(work)
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0) / batch)
    return float(np.median(times))


# the scorer's other paths, for --parity: each built on the device and on the CPU, fed the
# same calls, every score compared (a tensor left on the wrong device fails here, or, where
# a failure falls back on purpose, shows in bank_failures)
PARITY: dict[str, dict] = {
    "--stream-bank 4 (a camera's bank, warm)": {"stream_bank": 4, "warmup": 2},
    "--zoom": {"zoom": True},
    "--aggregate 1,3": {"aggregate": (1, 3)},
    "--reference-augment rotate": {"reference_augment": "rotate"},
    "--test-views flips": {"test_views": "flips"},
    "--method mutual (zero-shot, then few-shot)": {"method": "mutual", "warmup": 2},
}


def _calls(scorer, refs: list[np.ndarray], images: list[np.ndarray]) -> list[float]:
    """Every score the scorer's path gives. patch-knn: fitted, scored, a normal learned (the
    incremental path; a test photo stands in, parity does not care), scored again, and with a
    bank two rounds on one camera (the second against a warm bank); mutual: two rounds on one
    camera (warm-up, then its bank), then confirmed normals turn it few-shot."""
    mutual = hasattr(scorer, "mode")
    out: list[float] = []
    if not mutual:
        scorer.fit(refs)
        out += [r.score for r in scorer.score(images)]
        scorer.add_normals(images[:1])
        out += [r.score for r in scorer.score(images)]
    if getattr(scorer, "per_camera", False):
        half = len(images) // 2
        for batch in (images[:half], images[half:]):
            results = scorer.score(batch, ["cam"] * len(batch))
            out += [r.score for r in results]
            scorer.admit(results)
    if mutual:
        scorer.fit(refs)
        out += [r.score for r in scorer.score(images, ["cam"] * len(images))]
    return out


def parity(device: str, data: dict, weights: str | None) -> list[dict]:
    """Largest |device score - CPU score| of each PARITY path on each dataset."""
    rows = []
    for setting, kwargs in PARITY.items():
        for name, (refs, images) in data.items():
            got, failures = {}, None
            for where in (device, "cpu"):
                scorer = ScorerSettings(weights=weights, **kwargs).build(where)
                got[where] = np.array(_calls(scorer, refs, images))
                if where == device:  # patch-knn counts banks it could not match; mutual has no fallback
                    failures = getattr(scorer, "bank_failures", None)
            diff = float(np.max(np.abs(got[device] - got["cpu"])))
            rows.append({"setting": setting, "dataset": name, "device": device, "scores": len(got["cpu"]),
                         "max_score_difference_vs_cpu": diff, "bank_failures_on_device": failures})
            print(f"{setting:<44} {name:<14} {len(got['cpu'])} scores, |score - CPU's| <= {diff:.2g}, "
                  f"bank failures on {device}: {'n/a' if failures is None else failures}",
                  file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.presets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    ap.add_argument("--data", default=str(DATA), help="folder holding mvtec_ad/bottle and magnetic_tile "
                                                      "(default: ../shared/data)")
    ap.add_argument("--weights", default=None, help="DINOv2-S weights file (default: the one "
                                                    "scripts/bootstrap converts)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default: the worker's "
                                                        "--max-batch, 8)")
    ap.add_argument("--frames", type=int, default=8,
                    help="distinct photos per dataset (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed passes per batch size (default: 3)")
    ap.add_argument("--settings", default=None, metavar="NAMES",
                    help=f"only these rows, '|'-separated, from: {' | '.join(SETTINGS)}")
    ap.add_argument("--check", action="store_true", help="also score one batch on the CPU and report "
                                                         "the largest score difference")
    ap.add_argument("--parity", action="store_true",
                    help="instead of timing: run the scorer's other paths (camera banks, zoom, aggregation, "
                         "rotated references, learned normals, mutual scoring) on --device and on the CPU, "
                         "and report the largest score difference of each")
    ap.add_argument("--json", default=None,
                    help="where to write the rows (default: benchmarks/results/presets.json, "
                         "or parity.json with --parity)")
    a = ap.parse_args(argv)
    if a.parity:
        given = [f for f, v in (("--settings", a.settings), ("--batch-sizes", a.batch_sizes),
                                ("--repeats", a.repeats), ("--check", a.check or None)) if v is not None]
        if given:
            ap.error(f"{', '.join(given)}: --parity times nothing and runs its own paths; leave them out")
        if a.device == "cpu":
            ap.error("--parity compares a device with the CPU: give --device (e.g. cuda)")
    elif a.check and a.device == "cpu":
        ap.error("--check compares the device's scores with the CPU's: give --device (e.g. cuda)")
    batches = [int(b) for b in (a.batch_sizes or "8").split(",")]
    a.repeats = 3 if a.repeats is None else a.repeats
    if min(batches) < 1 or a.frames < 1 or a.repeats < 1:
        ap.error("--batch-sizes, --frames and --repeats must be >= 1")
    names = list(SETTINGS) if a.settings is None else [s.strip() for s in a.settings.split("|")]
    for n in names:
        if n not in SETTINGS:
            ap.error(f"--settings: unknown {n!r}; choose from {' | '.join(SETTINGS)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch sees no CUDA device here")
    data = {name: frames(Path(a.data), name, a.frames) for name in ("bottle", "magnetic_tile")}
    if a.parity:
        rows = parity(a.device, data, a.weights)
        table = [[r["setting"], r["dataset"], r["scores"], f"{r['max_score_difference_vs_cpu']:.2g}",
                  "n/a" if r["bank_failures_on_device"] is None else r["bank_failures_on_device"]]
                 for r in rows]
        print(markdown_table(["path", "data", "scores compared", "largest diff. from CPU",
                              f"bank failures on {a.device}"], table))
        print(f"wrote {save_rows(a.json or 'benchmarks/results/parity.json', rows)}", file=sys.stderr)
        return 0
    # the process's first scorer pays for thread pools, allocator growth and kernel selection:
    # without this pass the first rows measured up to 1.8x their own time when measured later
    warm = ScorerSettings(weights=a.weights, **SETTINGS[names[0]]).build(a.device)
    warm.fit(data["bottle"][0])
    time_scorer(warm, data["bottle"][1], max(batches), 1, a.device)
    del warm
    rows = []
    for setting in names:
        for name, (refs, images) in data.items():
            settings = ScorerSettings(weights=a.weights, **SETTINGS[setting])
            scorer = settings.build(a.device)
            scorer.fit(refs)
            row = {"setting": setting, "dataset": name, "device": a.device, "torch": torch.__version__,
                   "device_name": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} torch threads",
                   "ms_per_frame": {b: time_scorer(scorer, images, b, a.repeats, a.device) for b in batches}}
            if a.check and a.device != "cpu":
                cpu = settings.build("cpu")
                cpu.fit(refs)
                here = [r.score for r in scorer.score(images)]
                there = [r.score for r in cpu.score(images)]
                row["max_score_difference_vs_cpu"] = float(np.max(np.abs(np.array(here) - np.array(there))))
                row["score_range"] = [float(min(there)), float(max(there))]
            rows.append(row)
            print(f"{setting:<44} {name:<14} " + "  ".join(f"batch {b}: {ms:.1f} ms"
                  for b, ms in row["ms_per_frame"].items())
                  + (f"  |score - CPU's| <= {row['max_score_difference_vs_cpu']:.2g}"
                     if "max_score_difference_vs_cpu" in row else ""), file=sys.stderr, flush=True)
    print(markdown_table(["setting", "data", *[f"ms/frame, batch {b}" for b in batches]],
                         [[r["setting"], r["dataset"], *[f"{r['ms_per_frame'][b]:.1f}" for b in batches]]
                          for r in rows]))
    print(f"wrote {save_rows(a.json or 'benchmarks/results/presets.json', rows)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
