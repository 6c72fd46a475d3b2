"""References plus the camera's own recent frames: does a few-shot line gain from its stream?

A few-shot worker scores each frame by its nearest patches in the references alone. A
zero-shot worker (:class:`inference.mutual.MutualScorer`) scores each frame against a bank of
its stream's recent frames (the mean of the lowest 30 % of per-frame nearest distances, so a
defect repeated in a few bank frames is outvoted). ``--stream-bank FRAMES`` (patch-knn,
:class:`inference.scoring.PatchKNNScorer`) does both: per patch, the lower of its distance
to the references and its bank score (``--combine min``: the scorer's own ``_results`` and
``_with_banks`` on precomputed features, ``admit()``; each frame enters the bank at once,
where a worker admits a committed batch of up to 8 at a time, so a worker's frames meet a
bank that is up to a batch older: slightly optimistic), so no frame scores higher than
against the references alone and thresholds calibrated on them keep their bound.
``--combine members`` measures the other way to join them: the references as frames of the
bank's comparison set. With an empty bank the score is exactly the few-shot one, so every
row is comparable with the first.

Which frames enter the bank (the policies):

* ``none``: no bank, the references alone (today's few-shot worker);
* ``below-alert``: the frames that did not alert (what a worker admitted before it took
  the references' word instead): score, bank included, below the alert threshold
  calibrated on ``--calibration`` held-out normals scored against the references alone
  (:func:`inference.calibration.thresholds_from_normals`, 1 % false alarms);
* ``below-review``: only the frames a worker routes as normal: score below the review
  threshold calibrated on the same frames (10 % of normals flagged); borderline frames wait
  for a person instead of teaching the bank;
* ``references-below-alert``: what a worker admits (``ScoreResult.score_without_bank``):
  the frames whose score against the references alone is below the alert threshold (the
  bank cannot vouch for what enters it, so a defect that recurs cannot teach itself in;
  normal variety the references alone would alert on stays out too);
* ``all``: every frame, defects included (the worst case);
* ``normals-only``: only the truly normal frames (labels a worker does not have: an upper
  bound on what a bank can give).

The test sets are ``linewatch evaluate``'s (bottle: its test folder, 63 of 83 frames
defective; magnetic tile: all 392 defect images and 150 MT_Free images, 72 % defective), in
a random order per reference draw: far more defects than a line sees, so ``all`` and
``below-alert`` are pessimistic about what enters a bank. ``--protocol stream`` scores a
line's stream instead, 5 % defective: magnetic tile ``evaluate --protocol stream``'s frames
(400 MT_Free, 21 defects); bottle every normal photo (train and test) with 12 defects drawn
across the kinds (:func:`linewatch.evaluate.fewshot_stream_frames`, the stream `linewatch evaluate
--protocol stream` scores few-shot).
Metrics are evaluate's; the worker's defaults (DINOv2-S blocks 5 and 8, 224 px, tiling on),
the bank consulted from its 8th frame (``--warmup``). The features are computed once per
image; ms is the matching alone (the backbone's time is printed beside it).

    python -m benchmarks.stream_bank            # writes benchmarks/results/stream_bank.json
    python -m benchmarks.stream_bank --datasets bottle --seeds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._markdown import markdown_table, save_rows

RESULTS = Path(__file__).resolve().parent / "results" / "stream_bank.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"bottle": (DATA / "mvtec_ad" / "bottle", 1), "magnetic_tile": (DATA / "magnetic_tile", 4)}
POLICIES = ("none", "below-alert", "below-review", "references-below-alert", "all", "normals-only")


def _features(scorer, paths) -> dict:
    """Each image's (H, W, D) patch features (tiles joined), float16, and its shape."""
    from linewatch.images import read_rgb

    out = {}
    todo = list(dict.fromkeys(str(p) for p in paths))
    for i in range(0, len(todo), 8):
        images = [read_rgb(p) for p in todo[i:i + 8]]
        for idx, f in scorer._grouped_features(images):  # (1, n, H, W, D): one test view
            for j, k in enumerate(idx):
                out[todo[i + k]] = (f[0, j].to(torch.float16), images[k].shape[:2])
    return out


def _rows(f: torch.Tensor) -> torch.Tensor:
    return f.reshape(1, -1, f.shape[-1]).float()  # (1, P, D): one variant


def run_stream(scorer, samples: list, feats: dict, refs: list[str], th, policy: str,
               seed: int, combine: str = "min") -> dict:
    """One reference draw, one order of the frames: metrics and what entered the bank.
    ``th``: the thresholds calibrated on the references alone. ``combine`` min is the
    shipped path (PatchKNNScorer with ``stream_bank``: score(), admit()); members puts the
    references among the bank's frames instead."""
    from inference.scoring import bank_patch_scores
    from linewatch.evaluate import _seed_run

    scorer.fit_views([feats[p][0].reshape(-1, feats[p][0].shape[-1]) for p in refs])
    scorer.forget(["eval"])
    order = np.random.default_rng(seed).permutation(len(samples))
    results: dict[int, object] = {}
    admitted_defects = admitted = 0
    spent = 0.0
    for i in order:
        s = samples[i]
        f = feats[str(s.path)][0].float()[None]  # (1, H, W, D)
        t0 = time.perf_counter()
        alone, dist = scorer._results(f[None])  # the references alone (one test view)
        dist = dist[0]
        r = alone[0]
        if policy != "none" and combine == "min":
            r = scorer._with_banks(alone, dist, f, ["eval"])[0]
        elif policy != "none":  # members: references and bank frames, one comparison set
            others = [_rows(feats[p][0]) for p in refs]
            others += [b.float()[None] for b in scorer.banks.frames("eval")]
            patch = bank_patch_scores(_rows(f[0]), others)
            r = scorer._with_banks(alone, dist, f, ["eval"])[0]  # its stream state, for admit()
            # the references-alone score stays what admission asks, warm-up included (where
            # _with_banks leaves it unset and score_without_bank would read the members score)
            r = dataclasses.replace(r, score=float(scorer._image_scores(patch[None])[0]),
                                    anomaly_map=patch.reshape(r.anomaly_map.shape).numpy(),
                                    reference_score=alone[0].score)
        spent += time.perf_counter() - t0
        results[int(i)] = r
        enter = {"none": False, "all": True, "normals-only": not s.defect,
                 "below-alert": r.score < th.alert, "below-review": r.score < th.review,
                 "references-below-alert": r.score_without_bank < th.alert}[policy]
        if enter:
            admitted += 1
            admitted_defects += int(s.defect)
            scorer.admit([r])
    ordered = [results[i] for i in range(len(samples))]
    shapes = [feats[str(s.path)][1] for s in samples]
    run = _seed_run(seed, [], samples, ordered, shapes, spent, 256)
    return {**{k: run.metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_pro")},
            "match_ms": run.ms_per_image, "admitted": admitted, "admitted_defects": admitted_defects}


def measure(datasets: tuple[str, ...], seeds: int, bank_size: int, calibration: int,
            policies: tuple[str, ...], combine: str = "min", protocol: str = "test",
            references: int | None = None) -> list[dict]:
    from inference.calibration import thresholds_from_normals
    from inference.settings import ScorerSettings
    from linewatch.evaluate import fewshot_stream_frames, load_split

    # the worker's defaults (DINOv2-S blocks 5+8, 224 px, tiling, memory tolerance) and a bank
    scorer = ScorerSettings(stream_bank=bank_size).build()
    rows = []
    for name in datasets:
        root, shots = DATASETS[name]
        shots = references or shots
        split = load_split(root)
        draws = [[str(p) for p in split.references(shots + calibration, seed)] for seed in range(seeds)]
        frames = list(split.test) if protocol == "test" else fewshot_stream_frames(split)
        # a frame never scores against itself: each draw's references and calibration frames leave
        samples = [[f for f in frames if str(f.path) not in used] for used in map(set, draws)]
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = _features(scorer, [s.path for s in frames] + [p for d in draws for p in d])
        backbone_ms = 1000 * (time.perf_counter() - t0) / len(feats)
        calibrated = []
        for draw in draws:  # the thresholds a worker calibrates on the references alone
            scorer.fit_views([feats[p][0].reshape(-1, feats[p][0].shape[-1]) for p in draw[:shots]])
            held = [scorer._results(feats[p][0].float()[None, None])[0][0].score for p in draw[shots:]]
            calibrated.append(thresholds_from_normals(held))
        for policy in policies:
            per_seed = []
            for seed, (draw, th) in enumerate(zip(draws, calibrated, strict=True)):
                with torch.no_grad():
                    per_seed.append(run_stream(scorer, samples[seed], feats, draw[:shots], th, policy,
                                               seed, combine))
            row = {"dataset": name, "scorer": "patch-knn", "shots": shots, "policy": policy,
                   "combine": combine, "bank": 0 if policy == "none" else bank_size, "seeds": seeds,
                   "backbone_ms": backbone_ms}
            for k in per_seed[0]:
                row[k] = float(np.mean([r[k] for r in per_seed]))
            for k in ("image_auroc", "pixel_auroc", "pixel_pro"):
                row[k + "_std"] = float(np.std([r[k] for r in per_seed]))
            row["protocol"] = protocol
            row["defects_in_test"] = float(np.mean([sum(s.defect for s in x) for x in samples]))
            row["frames_in_test"] = float(np.mean([len(x) for x in samples]))
            rows.append(row)
            print(f"{name} {shots}-shot, {policy}: image {row['image_auroc']:.3f} pixel "
                  f"{row['pixel_auroc']:.3f} PRO {row['pixel_pro']:.3f}, admitted {row['admitted']:.0f} "
                  f"({row['admitted_defects']:.0f} defective), matching {row['match_ms']:.1f} ms", flush=True)
    return rows


def measure_mutual(datasets: tuple[str, ...], seeds: int, bank_size: int, calibration: int,
                   policies: tuple[str, ...], protocol: str, references: int) -> list[dict]:
    """The zero-shot worker once it has turned few-shot (``--method mutual``): ``references``
    confirmed normals in its memory (``none``: the memory alone, what ships), and its camera's
    bank beside them by the lower-of-two rule (``below-alert``: measured, not shipped: it
    changed nothing at 99 confirmed normals, README)."""
    from inference.calibration import thresholds_from_normals
    from inference.settings import ScorerSettings
    from linewatch.evaluate import _seed_run, fewshot_stream_frames, load_split
    from linewatch.images import read_rgb

    scorer = ScorerSettings(method="mutual", bank_size=bank_size).build()
    rows = []
    for name in datasets:
        split = load_split(DATASETS[name][0])
        draws = [[str(p) for p in split.references(references + calibration, seed)] for seed in range(seeds)]
        frames = list(split.test) if protocol == "test" else fewshot_stream_frames(split)
        samples = [[f for f in frames if str(f.path) not in used] for used in map(set, draws)]
        t0 = time.perf_counter()
        feats: dict = {}
        paths = list(dict.fromkeys(str(s.path) for s in frames))
        with torch.no_grad():
            for i in range(0, len(paths), 8):
                images = [read_rgb(p) for p in paths[i:i + 8]]
                for p, f, im in zip(paths[i:i + 8], scorer.features(images), images, strict=True):
                    feats[p] = (f.stored(), im.shape[:2])
        backbone_ms = 1000 * (time.perf_counter() - t0) / len(feats)
        per_policy: dict[str, list[dict]] = {p: [] for p in policies}
        for seed, draw in enumerate(draws):
            with torch.no_grad():
                scorer.fit([read_rgb(p) for p in draw[:references]])
                scorer.start_few_shot()
                held = scorer.prepare([read_rgb(p) for p in draw[references:]]).results
            alert = thresholds_from_normals([r.score for r in held]).alert
            for policy in policies:
                scorer.forget(["eval"])
                order = np.random.default_rng(seed).permutation(len(samples[seed]))
                results: dict[int, object] = {}
                admitted = admitted_defects = 0
                spent = 0.0
                for i in order:
                    s = samples[seed][i]
                    f = feats[str(s.path)][0]
                    t1 = time.perf_counter()
                    with torch.no_grad():
                        r = scorer._few_shot(f, "eval")  # the memory alone, as the worker scores
                        bank = scorer.banks.frames("eval")
                        if policy != "none" and len(bank) >= scorer.warmup:  # the bank beside it
                            patch = torch.minimum(torch.from_numpy(r.anomaly_map).flatten(),
                                                  scorer._patch_scores(f, bank))
                            r = scorer._result(f, patch, "few-shot", "eval")
                    spent += time.perf_counter() - t1
                    results[int(i)] = r
                    if policy != "none" and r.score < alert:  # what the worker admits
                        scorer.admit([r])
                        admitted += 1
                        admitted_defects += int(s.defect)
                ordered = [results[i] for i in range(len(samples[seed]))]
                shapes = [feats[str(s.path)][1] for s in samples[seed]]
                run = _seed_run(seed, [], samples[seed], ordered, shapes, spent, 256)
                per_policy[policy].append({**{k: run.metrics[k] for k in ("image_auroc", "pixel_auroc",
                                                                           "pixel_pro")},
                                           "match_ms": run.ms_per_image, "admitted": admitted,
                                           "admitted_defects": admitted_defects})
        for policy, per_seed in per_policy.items():
            row = {"dataset": name, "scorer": "mutual", "shots": references, "policy": policy,
                   "combine": "min", "bank": 0 if policy == "none" else bank_size, "seeds": seeds,
                   "backbone_ms": backbone_ms, "protocol": protocol}
            for k in per_seed[0]:
                row[k] = float(np.mean([r[k] for r in per_seed]))
            for k in ("image_auroc", "pixel_auroc", "pixel_pro"):
                row[k + "_std"] = float(np.std([r[k] for r in per_seed]))
            row["defects_in_test"] = float(np.mean([sum(s.defect for s in x) for x in samples]))
            row["frames_in_test"] = float(np.mean([len(x) for x in samples]))
            rows.append(row)
            print(f"{name} mutual, {references} confirmed, {policy}: image {row['image_auroc']:.3f} pixel "
                  f"{row['pixel_auroc']:.3f} PRO {row['pixel_pro']:.3f}, matching {row['match_ms']:.1f} ms",
                  flush=True)
    return rows


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["data", "bank admits", "bank frames", "image AUROC", "pixel AUROC", "PRO",
         "frames admitted (defective) / test frames", "matching ms/frame"],
        [[(f"{r['dataset']} mutual, {r['shots']} confirmed" if r.get("scorer") == "mutual" else
           f"{r['dataset']} {r['shots']}-shot") + (", stream" if r["protocol"] == "stream" else ""),
          r["policy"] + (f" ({r['combine']})" if r["bank"] else ""), r["bank"],
          f"{r['image_auroc']:.3f} ± {r['image_auroc_std']:.3f}", f"{r['pixel_auroc']:.3f}",
          f"{r['pixel_pro']:.3f}",
          f"{r['admitted']:.0f} ({r['admitted_defects']:.0f}) / {r['frames_in_test']:.0f}",
          f"{r['match_ms']:.1f}"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stream_bank", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="bottle,magnetic_tile", help="default: %(default)s")
    ap.add_argument("--seeds", type=int, default=3,
                    help="reference draws (and test orders) (default: %(default)s)")
    ap.add_argument("--bank", type=int, default=32,
                    help="bank frames, the zero-shot worker's (default: %(default)s)")
    ap.add_argument("--calibration", type=int, default=20,
                    help="held-out normals that set the policies' thresholds (default: %(default)s)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="default: %(default)s")
    ap.add_argument("--combine", choices=("min", "members"), default="min",
                    help="min (what ships): per patch, the lower of the references' score and the bank's "
                         "mutual score, so no frame scores higher than against the references alone; "
                         "members: the references are frames of the bank's comparison set "
                         "(default: %(default)s)")
    ap.add_argument("--scorer", choices=("patch-knn", "mutual"), default="patch-knn",
                    help="patch-knn (--stream-bank); mutual: the zero-shot worker once turned "
                         "few-shot, --references confirmed normals in its memory, and a bank beside "
                         "them (not shipped); policies none and below-alert only (default: %(default)s)")
    ap.add_argument("--references", type=int, default=None,
                    help="references per draw (default: bottle 1, magnetic tile 4; a zero-shot worker "
                         "turns few-shot with 99 confirmed normals in its memory at 1%% false alarms)")
    ap.add_argument("--protocol", choices=("test", "stream"), default="test",
                    help="test: linewatch evaluate's test sets (mostly defects); stream: a line's "
                         "stream with 5%% defects (see above), less each draw's references and "
                         "calibration frames (default: %(default)s)")
    ap.add_argument("--torch-threads", type=int, default=2,
                    help="default: %(default)s (the CI machine's cores)")
    ap.add_argument("--json", default=str(RESULTS), help="default: %(default)s")
    a = ap.parse_args(argv)
    datasets = tuple(a.datasets.split(","))
    policies = tuple(a.policies.split(","))
    if set(datasets) - set(DATASETS):
        ap.error(f"--datasets: unknown {', '.join(sorted(set(datasets) - set(DATASETS)))}; "
                 f"choose from {', '.join(DATASETS)}")
    if set(policies) - set(POLICIES):
        ap.error(f"--policies: unknown {', '.join(sorted(set(policies) - set(POLICIES)))}; "
                 f"choose from {', '.join(POLICIES)}")
    if a.seeds < 1 or a.bank < 1 or a.calibration < 2:
        ap.error("need --seeds >= 1, --bank >= 1, --calibration >= 2")
    torch.set_num_threads(a.torch_threads)
    if a.references is not None and a.references < 1:
        ap.error("--references: at least 1")
    if a.scorer == "mutual":
        if set(policies) - {"none", "below-alert"} or a.combine != "min" or a.references is None:
            ap.error("--scorer mutual: give --references N, policies none and/or below-alert, --combine min")
        rows = measure_mutual(datasets, a.seeds, a.bank, a.calibration, policies, a.protocol, a.references)
    else:
        rows = measure(datasets, a.seeds, a.bank, a.calibration, policies, a.combine, a.protocol,
                       a.references)
    print(table(rows))
    print(f"json: {save_rows(a.json, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
