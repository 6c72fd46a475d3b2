"""``linewatch evaluate``: few-/zero-shot quality on a labelled dataset folder.

The reference images are a seeded random draw of ``shots`` normal images; the
run is repeated for every seed and reported as mean +- std, because with one
or four shots *which* images are drawn matters as much as the method.

Layouts understood:

* MVTec AD category (``train/good``, ``test/<type>``, ``ground_truth/<type>/<stem>_mask.png``):
  references from ``train/good``, the whole ``test`` folder as the test set.
* Magnetic tile (``MT_<Class>/Imgs/*.jpg`` with same-stem ``.png`` masks):
  references from ``MT_Free``; the test set is every defect image plus a fixed
  draw of 150 ``MT_Free`` images that are never used as references.

Pixel metrics are computed with maps and masks resized so the longer side is at
most ``eval_size`` (256 by default, as the common benchmarks do).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MT_TEST_NORMALS = 150
MT_TEST_SEED = 20_240_101  # fixed, independent of the reference draw


class DatasetError(ValueError):
    """The --data folder is not a layout evaluate understands."""


@dataclass(frozen=True)
class Sample:
    path: Path
    defect: bool
    kind: str  # "good" or the defect type
    mask: Path | None


@dataclass(frozen=True)
class Split:
    name: str
    layout: str
    candidates: list[Path]  # normal images the references are drawn from
    test: list[Sample]

    def references(self, shots: int, seed: int) -> list[Path]:
        if shots > len(self.candidates):
            raise DatasetError(f"{shots} shots asked but {self.name} has {len(self.candidates)} normals")
        order = np.random.default_rng(seed).permutation(len(self.candidates))
        return [self.candidates[i] for i in order[:shots]]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")
                  and not p.stem.endswith("_mask"))


def load_split(root: str | Path, defect_types: Sequence[str] | None = None) -> Split:
    """Find the layout of ``root`` and build the reference pool and test set."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--data {root} is not a folder")
    if (root / "train" / "good").is_dir() and (root / "test").is_dir():
        cands = _images(root / "train" / "good")
        test: list[Sample] = []
        for d in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
            for img in _images(d):
                mask = root / "ground_truth" / d.name / f"{img.stem}_mask.png"
                test.append(Sample(img, d.name != "good", d.name, mask if mask.is_file() else None))
        split = Split(root.name, "mvtec", cands, test)
    elif (root / "MT_Free" / "Imgs").is_dir():
        free = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))
        order = np.random.default_rng(MT_TEST_SEED).permutation(len(free))
        test_free = {free[i] for i in order[:MT_TEST_NORMALS]}
        cands = [p for p in free if p not in test_free]
        test = [Sample(p, False, "good", None) for p in sorted(test_free)]
        for d in sorted(root.glob("MT_*")):
            if d.name == "MT_Free" or not (d / "Imgs").is_dir():
                continue
            kind = d.name.removeprefix("MT_").lower()
            test += [Sample(p, True, kind, p.with_suffix(".png")) for p in sorted((d / "Imgs").glob("*.jpg"))]
        split = Split(root.name, "magnetic-tile", cands, test)
    else:
        raise DatasetError(
            f"--data {root}: expected an MVTec AD category (train/good, test/, ground_truth/) or the "
            "magnetic-tile dataset (MT_Free/Imgs, MT_<Defect>/Imgs)"
        )
    if defect_types:
        unknown = set(defect_types) - {s.kind for s in split.test}
        if unknown:
            kinds = sorted({s.kind for s in split.test if s.defect})
            raise DatasetError(f"--defect-types {sorted(unknown)} not in {split.name}; it has {kinds}")
        split = Split(split.name, split.layout, split.candidates,
                      [s for s in split.test if not s.defect or s.kind in defect_types])
    if not any(s.defect for s in split.test) or all(s.defect for s in split.test):
        raise DatasetError(f"{root}: the test set needs both normal and defective images")
    return split


def _eval_shape(h: int, w: int, eval_size: int) -> tuple[int, int]:
    s = min(1.0, eval_size / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def read_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """Binary mask at ``shape`` (h, w); any non-zero pixel of the file is defect."""
    import cv2

    if sample.mask is None:
        return np.zeros(shape, bool)
    m = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DatasetError(f"mask {sample.mask} is not readable")
    m = cv2.resize((m > 0).astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return m >= 0.5


@dataclass
class SeedRun:
    seed: int
    references: list[str]
    scores: np.ndarray
    metrics: dict[str, float]
    ms_per_image: float
    maps: list[np.ndarray]  # at eval resolution, for the pictures


def evaluate_seed(scorer, split: Split, shots: int, seed: int, *, batch_size: int = 8,
                  eval_size: int = 256, progress: bool = True) -> SeedRun:
    """Fit on one reference draw and score the whole test set; ``shots`` 0 with a mutual
    scorer: the test set scores itself (MuSc's batch protocol, no references)."""
    from tqdm import tqdm

    from linewatch.images import read_rgb

    refs = split.references(shots, seed) if shots else []  # winclip zero-shot: fit([]) sets no memory
    bar = tqdm(total=len(split.test), desc=f"{split.name} seed {seed}", unit="img", disable=not progress,
               leave=False)
    spent = 0.0
    if shots == 0 and hasattr(scorer, "score_features"):
        # mutual zero-shot, batch protocol: features of all, then every image against the others
        images = [read_rgb(s.path) for s in split.test]
        t0 = time.perf_counter()
        feats = []
        for i in range(0, len(images), batch_size):
            feats += scorer.features(images[i:i + batch_size])
            bar.update(len(images[i:i + batch_size]))
        results = scorer.score_features(feats)
        spent = time.perf_counter() - t0
        shapes = [im.shape[:2] for im in images]
    else:
        scorer.fit([read_rgb(p) for p in refs])
        results, shapes = [], []
        for i in range(0, len(split.test), batch_size):
            images = [read_rgb(s.path) for s in split.test[i:i + batch_size]]
            t0 = time.perf_counter()
            results += scorer.score(images)
            spent += time.perf_counter() - t0
            shapes += [im.shape[:2] for im in images]
            bar.update(len(images))
    bar.close()
    return _seed_run(seed, [str(p) for p in refs], split.test, results, shapes, spent, eval_size)


def _seed_run(seed: int, refs: list[str], samples: Sequence[Sample], results: Sequence, shapes: Sequence,
              spent: float, eval_size: int) -> SeedRun:
    from inference import eval_metrics as em
    from inference.visualize import upsample_map

    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for s, shape, r in zip(samples, shapes, results, strict=True):
        h, w = _eval_shape(shape[0], shape[1], eval_size)
        sigma = 4.0 * max(h, w) / 256  # the customary 4 px at 256 px
        maps.append(upsample_map(r.anomaly_map, w, h, sigma=sigma))
        masks.append(read_mask(s, (h, w)))
    labels = np.array([s.defect for s in samples])
    sc = np.array([r.score for r in results])
    pix_true = np.concatenate([m.ravel() for m in masks])
    pix_score = np.concatenate([m.ravel() for m in maps])
    metrics = {
        "image_auroc": em.auroc(labels, sc),
        "image_ap": em.average_precision(labels, sc),
        "image_f1max": em.f1_max(labels, sc),
        "pixel_auroc": em.auroc(pix_true, pix_score),
        "pixel_pro": em.pro_auc(masks, maps),
        "pixel_f1max": em.f1_max(pix_true, pix_score),
    }
    kinds = sorted({s.kind for s in samples if s.defect})
    for k in kinds:
        sel = np.array([(not s.defect) or s.kind == k for s in samples])
        metrics[f"image_auroc/{k}"] = em.auroc(labels[sel], sc[sel])
    return SeedRun(seed, refs, sc, metrics, 1000.0 * spent / max(1, len(samples)), maps)


# The stream protocol (zero-shot as a worker meets it): frames in a random order, each
# scored only against frames before it. Magnetic tile: a fixed draw of MT_Free images with
# defects mixed in at STREAM_DEFECT_RATE, the same for every seed (the seed orders it).
STREAM_DEFECT_RATE = 0.05
MT_STREAM_NORMALS = 400
MT_STREAM_SEED = 20_240_202


def stream_frames(split: Split, root: str | Path | None = None) -> list[Sample]:
    """The stream protocol's frames, unordered: an MVTec category's test set as it is; for
    magnetic tile ``MT_STREAM_NORMALS`` MT_Free images (references and test normals alike:
    no image is a reference in zero-shot) plus defect images drawn across types to make
    ``STREAM_DEFECT_RATE`` of the stream."""
    if split.layout != "magnetic-tile":
        return list(split.test)
    normals = [Sample(p, False, "good", None) for p in sorted(
        [*split.candidates, *(s.path for s in split.test if not s.defect)])]
    defects = [s for s in split.test if s.defect]
    rng = np.random.default_rng(MT_STREAM_SEED)
    n_def = round(MT_STREAM_NORMALS * STREAM_DEFECT_RATE / (1 - STREAM_DEFECT_RATE))
    picked = [normals[i] for i in sorted(rng.choice(len(normals), MT_STREAM_NORMALS, replace=False))]
    picked += [defects[i] for i in sorted(rng.choice(len(defects), n_def, replace=False))]
    return picked


def describe_stream(frames: Sequence[Sample]) -> str:
    """One line: what the stream is made of (printed by ``evaluate --protocol stream``)."""
    kinds: dict[str, int] = {}
    for s in frames:
        if s.defect:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
    n_def = sum(kinds.values())
    parts = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    return (f"{len(frames)} frames: {len(frames) - n_def} normal, {n_def} defective "
            f"({100.0 * n_def / len(frames):.1f}%: {parts})")


def evaluate_stream(scorer, split: Split, seed: int, *, expected_anomaly_rate: float = STREAM_DEFECT_RATE,
                    eval_size: int = 256, progress: bool = True) -> tuple[SeedRun, Split]:
    """Zero-shot, stream protocol: the frames of :func:`stream_frames` in the seed's order,
    one at a time, each against the bank of frames before it; frames whose score reaches
    the stream's own (uncalibrated) alert threshold stay out of the bank, as in a worker.
    The first ``scorer.warmup`` frames are the warm-up (a worker sends them to review):
    metrics are over the frames after it. Returns the run and the frames it covers."""
    from tqdm import tqdm

    from inference.calibration import StreamThresholds
    from linewatch.images import read_rgb

    frames = stream_frames(split)
    order = np.random.default_rng(seed).permutation(len(frames))
    frames = [frames[i] for i in order]
    scorer.fit([])
    scorer.forget(["eval"])
    th = StreamThresholds(expected_anomaly_rate)
    results, shapes, spent = [], [], 0.0
    for s in tqdm(frames, desc=f"{split.name} stream {seed}", unit="img", disable=not progress, leave=False):
        im = read_rgb(s.path)
        t0 = time.perf_counter()
        r = scorer.score([im], ["eval"])[0]
        t = th.thresholds("eval")
        if t is None or r.score < t.alert:
            scorer.admit([r])
        spent += time.perf_counter() - t0
        if r.mode != "warm-up":
            th.observe("eval", r.score)
        results.append(r)
        shapes.append(im.shape[:2])
    w = scorer.warmup
    kept = frames[w:]
    run = _seed_run(seed, [], kept, results[w:], shapes[w:], spent * len(kept) / len(frames), eval_size)
    return run, Split(split.name, split.layout, [], kept)


# The few-shot stream protocol (a few-shot line as a worker meets it): the normal photos of
# the line with defects mixed in at STREAM_DEFECT_RATE, less each draw's references and
# calibration frames; thresholds from FEWSHOT_CALIBRATION held-out normals, as calibrate sets them.
FEWSHOT_CALIBRATION = 20


def fewshot_stream_frames(split: Split) -> list[Sample]:
    """A line's stream, 5 % defective, before a draw's references and calibration frames are
    taken out: magnetic tile :func:`stream_frames`; an MVTec category's normal photos
    (``train/good`` and ``test/good``) with defect photos drawn across the kinds (fixed seed)
    to make ``STREAM_DEFECT_RATE`` of the frames. (The zero-shot stream of an MVTec category is
    its test set as it is, as MuSc measures; a few-shot line has the normals to be a line.)"""
    if split.layout == "magnetic-tile":
        return stream_frames(split)
    normals = [Sample(p, False, "good", None) for p in split.candidates]
    normals += [s for s in split.test if not s.defect]
    defects = [s for s in split.test if s.defect]
    n_def = round(len(normals) * STREAM_DEFECT_RATE / (1 - STREAM_DEFECT_RATE))
    rng = np.random.default_rng(MT_STREAM_SEED)
    return normals + [defects[i] for i in sorted(rng.choice(len(defects), min(n_def, len(defects)),
                                                            replace=False))]


def evaluate_fewshot_stream(scorer, split: Split, shots: int, seed: int, *,
                            calibration: int = FEWSHOT_CALIBRATION, batch_size: int = 8,
                            eval_size: int = 256, progress: bool = True) -> tuple[SeedRun, Split]:
    """Few-shot, stream protocol: what a worker with a calibrated profile does on a line.

    The seed draws ``shots`` references and ``calibration`` held-out normals from the
    reference pool; the alert threshold is calibrate's (1 % false alarms on the held-out
    normals scored against the references alone). The stream's frames (less the draw) come
    in the seed's order, ``batch_size`` at a time, as a worker polls them; a scorer with a
    camera bank (``--stream-bank``) scores each batch with its camera, then admits the frames
    the references alone do not alert on, as a worker does when it commits the batch. Every
    frame counts (a bank still warming up leaves its frames to the references). Returns the
    run and its frames."""
    from tqdm import tqdm

    from inference.calibration import score_frames, thresholds_from_normals
    from linewatch.images import read_rgb

    draw = split.references(shots + calibration, seed)
    refs, held = draw[:shots], draw[shots:]
    used = set(draw)
    frames = [s for s in fewshot_stream_frames(split) if s.path not in used]
    order = np.random.default_rng(seed).permutation(len(frames))
    frames = [frames[i] for i in order]
    scorer.fit([read_rgb(p) for p in refs])
    per_camera = bool(getattr(scorer, "per_camera", False))
    if per_camera:
        scorer.forget(["eval"])
    alert = thresholds_from_normals([r.score for r in score_frames(scorer, [read_rgb(p) for p in held],
                                                                   batch_size)]).alert
    results, shapes, spent = [], [], 0.0
    bar = tqdm(total=len(frames), desc=f"{split.name} stream {seed}", unit="img", disable=not progress,
               leave=False)
    for i in range(0, len(frames), batch_size):
        images = [read_rgb(s.path) for s in frames[i:i + batch_size]]
        t0 = time.perf_counter()
        batch = scorer.score(images, ["eval"] * len(images)) if per_camera else scorer.score(images)
        if per_camera:  # the batch is committed: what the references alone pass joins the bank
            scorer.admit([r for r in batch if r.score_without_bank < alert])
        spent += time.perf_counter() - t0
        results += batch
        shapes += [im.shape[:2] for im in images]
        bar.update(len(images))
    bar.close()
    run = _seed_run(seed, [str(p) for p in refs], frames, results, shapes, spent, eval_size)
    return run, Split(split.name, split.layout, [], frames)


METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_pro", "pixel_f1max")


def summarise(runs: list[SeedRun], split: Split, config: dict) -> dict:
    """Mean +- std over seeds, in the JSON shape ``--json`` writes."""
    out: dict = {"dataset": split.name, "layout": split.layout, **config,
                 "n_images": len(split.test), "n_defective": sum(s.defect for s in split.test),
                 "seeds": [r.seed for r in runs]}
    # per-defect-kind keys exist for the kinds each run saw: a stream's warm-up may swallow a rare
    # kind's only image in one order, so a kind is summarised only where every run has it
    keys = [k for k in runs[0].metrics if all(k in r.metrics for r in runs)]
    for k in keys:
        vals = np.array([r.metrics[k] for r in runs])
        out[k] = float(vals.mean())
        out[f"{k}_std"] = float(vals.std(ddof=0))
    out["ms_per_image"] = float(np.mean([r.ms_per_image for r in runs]))
    out["per_seed"] = [{"seed": r.seed, "references": r.references, **r.metrics,
                        "ms_per_image": r.ms_per_image} for r in runs]
    return out


def table(summary: dict) -> str:
    rows = [f"{'metric':<14} {'mean':>7} {'std':>7}"]
    for k in (*METRIC_KEYS, *sorted(k for k in summary if k.startswith("image_auroc/") and
                                    not k.endswith("_std"))):
        rows.append(f"{k:<14} {summary[k]:>7.4f} {summary[k + '_std']:>7.4f}")
    rows.append(f"{'ms/image':<14} {summary['ms_per_image']:>7.1f}")
    return "\n".join(rows)


def save_roc_plot(run: SeedRun, split: Split, path: Path, title: str) -> None:
    """Image-level ROC curve of one seed, with the AUROC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inference import eval_metrics as em

    labels = np.array([s.defect for s in split.test])
    fpr, tpr, _ = em.roc_curve(labels, run.scores)
    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=120)
    ax.plot(fpr, tpr, lw=2, label=f"image AUROC {run.metrics['image_auroc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false-positive rate (normal images flagged)", ylabel="true-positive rate (defects found)",
           xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_overlay_grid(run: SeedRun, split: Split, path: Path, per_kind: int = 2, cols: int = 6,
                      tile: int = 200) -> None:
    """A grid of heatmap overlays (defect outlines in white), a few per defect type and normals.

    Colours use one scale for the whole grid - from the median normal-pixel value
    to the 99.9th percentile of all map values - so a hot spot means the same
    thing in every tile.
    """
    import cv2

    from inference.visualize import overlay
    from linewatch.images import read_rgb

    normal_px = np.concatenate([m.ravel() for m, s in zip(run.maps, split.test, strict=True) if not s.defect])
    vmin = float(np.median(normal_px))
    vmax = float(np.quantile(np.concatenate([m.ravel() for m in run.maps]), 0.999))
    picks: list[int] = []
    for kind in sorted({s.kind for s in split.test}):
        idx = [i for i, s in enumerate(split.test) if s.kind == kind]
        picks += idx[:: max(1, len(idx) // per_kind)][:per_kind]
    rows = (len(picks) + cols - 1) // cols
    canvas = np.full((rows * (tile + 22), cols * tile, 3), 255, np.uint8)
    for n, i in enumerate(picks):
        s, amap = split.test[i], run.maps[i]
        h, w = amap.shape
        rgb = cv2.resize(read_rgb(s.path), (w, h), interpolation=cv2.INTER_AREA)
        img = overlay(rgb, amap, vmin, vmax)
        mask = read_mask(s, (h, w)).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, (255, 255, 255), 1)
        scale = tile / max(h, w)
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))))
        r, c = divmod(n, cols)
        y0, x0 = r * (tile + 22), c * tile
        canvas[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = img
        cv2.putText(canvas, f"{s.kind} {run.scores[i]:.3f}", (x0 + 3, y0 + tile + 16),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))


def run_evaluation(scorer, split: Split, *, shots: int, seeds: Sequence[int], config: dict,
                   json_path: Path | None, plots_dir: Path | None, batch_size: int = 8,
                   eval_size: int = 256, progress: bool = True, protocol: str = "batch",
                   expected_anomaly_rate: float = STREAM_DEFECT_RATE,
                   calibration: int = FEWSHOT_CALIBRATION) -> dict:
    """Every seed's run, summarised (and written to ``json_path``, pictures to ``plots_dir``).
    ``protocol`` "stream": :func:`evaluate_stream` per seed (zero-shot, ``shots`` 0) or
    :func:`evaluate_fewshot_stream`."""
    runs, covered = [], split
    for seed in seeds:
        if protocol == "stream":
            run, kept = (evaluate_stream(scorer, split, seed, expected_anomaly_rate=expected_anomaly_rate,
                                         eval_size=eval_size, progress=progress) if shots == 0 else
                         evaluate_fewshot_stream(scorer, split, shots, seed, calibration=calibration,
                                                 batch_size=batch_size, eval_size=eval_size,
                                                 progress=progress))
            covered = kept if not runs else covered  # the first seed's order is the one pictured
        else:
            run = evaluate_seed(scorer, split, shots, seed, batch_size=batch_size, eval_size=eval_size,
                                progress=progress)
        runs.append(run)
    summary = summarise(runs, covered, config)
    summary["protocol"] = protocol
    if protocol == "stream" and shots == 0:
        summary["stream"] = describe_stream(stream_frames(split))  # n_images: those after the warm-up
        summary["warmup_frames"] = scorer.warmup
    elif protocol == "stream":
        summary["stream"] = describe_stream(covered.test)  # the first draw's frames
        summary["calibration_normals"] = calibration
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        bank = getattr(scorer, "stream_bank", 0)
        what = f"{shots}shot" + ("_stream" if protocol == "stream" else "") + (f"_bank{bank}" if bank else "")
        title = f"{split.name}, {config['method']} {config['backbone']}, {shots}-shot" + (
            ", stream" if protocol == "stream" else "")
        roc = plots_dir / f"{split.name}_{config['method']}_{what}_roc.png"
        grid = plots_dir / f"{split.name}_{config['method']}_{what}_overlays.png"
        save_roc_plot(runs[0], covered, roc, title)
        save_overlay_grid(runs[0], covered, grid)
        summary["plots"] = {"roc": str(roc), "overlays": str(grid)}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2))
    return summary
