"""Model flags (one per :class:`~inference.settings.ScorerSettings` field), ``evaluate`` and
``calibrate``.

Every model flag defaults to "not given": the defaults live in ``ScorerSettings``
alone, so a flag that was typed can be told from one that was not (a ``--profile``
worker refuses a typed flag that contradicts its profile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from inference import set_torch_threads
from inference.settings import (
    AUGMENTS,
    DEFAULTS,
    MEMORY_TOLERANCE_DEFAULTS,
    METHODS,
    PRECISIONS,
    PRESETS,
    TEST_VIEWS,
    ScorerSettings,
    SettingsError,
    flag_name,
)
from linewatch.cli._common import FMT, CliError

_NOT_GIVEN = argparse.SUPPRESS
ZERO_SHOT = ("mutual", "winclip", "anomalyclip")  # methods that evaluate with --shots 0
# train-prompts' training flags: (flag, type, default, help)
TRAIN_PROMPT_FLAGS = (("--steps", int, 200, "optimiser steps"), ("--lr", float, 1e-3, "Adam's step size"),
                      ("--batch-size", int, 8, "images per step"),
                      ("--context", int, 12, "learned tokens per prompt"),
                      ("--deep-depth", int, None, "text blocks with learned tokens, the input's "
                       "included (1 = the input only; default: 9 as the paper, or the text tower's "
                       "depth where that is less)"),
                      ("--deep-length", int, None, "learned tokens in each deeper text block "
                       "(default: 4 as the paper, or --context where that is less)"),
                      ("--seed", int, 0, "seed"))


def _default(name: str) -> str:
    return f"default: {getattr(DEFAULTS, name)}"


def model_args(p: argparse.ArgumentParser, vocabulary: bool = False) -> None:
    """The scorer's flags; ``vocabulary`` for the commands that explain frames (worker,
    calibrate, whose profile a worker explains with)."""
    g = p.add_argument_group("model (inference.settings.ScorerSettings)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named set of the options below, which options typed beside it override; "
                        + "; ".join(f"{k}: " + ", ".join(f"{flag_name(n)} {_show(v)}" for n, v in o.items())
                                    for k, o in PRESETS.items())
                        + " (for GPUs: 2-3.5x the default's compute; see the README's table)")
    g.add_argument("--scorer", "--method", dest="method", default=_NOT_GIVEN, choices=METHODS,
                   help="patch-knn: nearest-patch few-shot on a visual backbone; mutual: zero-shot "
                        "with no references and no text model, each frame scored by its camera's "
                        "other recent frames (MuSc), few-shot once operators confirm normals; "
                        "anomalyclip: zero-shot with learned prompts (--prompts); winclip: zero-shot "
                        "from text prompts; winclip+: zero- plus few-shot (both need an openclip: "
                        "backbone); noop: scores nothing, only for measuring pipeline overhead "
                        f"({_default('method')})")
    g.add_argument("--backbone", default=_NOT_GIVEN, metavar="NAME",
                   help="dinov2-s | efficientnet-lite0 | openclip:ARCH (e.g. "
                        "openclip:ViT-B-16-plus-240, needs --weights) (default: dinov2-s for "
                        "patch-knn, openclip:ViT-B-16-plus-240 for winclip)")
    g.add_argument("--weights", "--dinov2-weights", dest="weights", metavar="PATH", default=_NOT_GIVEN,
                   help="local weights file for the backbone (default: dinov2-s and "
                        "efficientnet-lite0 come from their installed packages; CLIP has no default)")
    g.add_argument("--image-size", type=int, default=_NOT_GIVEN,
                   help="model resolution for visual backbones (default: 224 for dinov2-s, a "
                        "multiple of 14; 256 for efficientnet-lite0); anomalyclip: the CLIP's own "
                        "by default, or a multiple of its patch size, position embeddings "
                        "interpolated (AnomalyCLIP runs ViT-L-14-336 at 518)")
    g.add_argument("--layers", type=_layers, default=_NOT_GIVEN,
                   help="visual backbones: blocks/stages whose patch features are compared "
                        "(default: 5,8 for dinov2-s, 2,3 for efficientnet-lite0)")
    g.add_argument("--random-init", action="store_true", default=_NOT_GIVEN,
                   help="openclip: backbones only: random weights (for speed and correctness runs, "
                        "never for quality)")
    g.add_argument("--prompts", default=_NOT_GIVEN, metavar="FILE",
                   help="anomalyclip: learned object-agnostic prompts (safetensors) from `linewatch "
                        "train-prompts` for the same openclip: backbone (required)")
    g.add_argument("--class-name", default=_NOT_GIVEN,
                   help="what the camera sees, for CLIP's text prompts and defect words, e.g. "
                        f"'bottle' ({_default('class_name')})")
    g.add_argument("--reference-augment", default=_NOT_GIVEN, choices=AUGMENTS,
                   help="patch-knn: also remember each reference rotated by 90/180/270 degrees "
                        "(and mirrored); for parts that may arrive in any orientation "
                        f"({_default('reference_augment')})")
    g.add_argument("--test-views", default=_NOT_GIVEN, choices=TEST_VIEWS,
                   help="patch-knn: flips: also score each frame mirrored left-right, top-bottom "
                        "and turned 180 degrees, each view against the references seen the same "
                        "way (orientation still counts), maps averaged; 4 backbone passes a frame. "
                        "linewatch evaluate, image/pixel/PRO: bottle 1-shot 0.990/0.985/0.929 -> "
                        "0.996/0.986/0.930, magnetic tile 4-shot 0.809/0.696/0.717 -> 0.816/0.706/"
                        "0.729 at 224 px; with --preset quality tiles 0.821/0.709/0.749 -> "
                        "0.827/0.717/0.759, bottle unchanged; about 4x the time on CPU "
                        f"({_default('test_views')})")
    g.add_argument("--aggregate", type=_sizes, default=_NOT_GIVEN, metavar="R[,R]",
                   help="patch-knn: describe each patch also by the mean of its r x r "
                        "neighbourhood, e.g. 1,3 (PatchCore's local aggregation); pays on objects "
                        "at 448 px, costs on textures (see the README's technique table) "
                        "(default: 1, the patch alone). mutual: score each size on its own and "
                        "average the scores (MuSc's LNAMD)")
    g.add_argument("--bank-size", type=int, default=_NOT_GIVEN, metavar="FRAMES",
                   help="mutual: each camera's frames are scored against its last FRAMES frames "
                        "that did not alert (cost grows with it: see the README's table) "
                        f"({_default('bank_size')})")
    g.add_argument("--warmup", type=int, default=_NOT_GIVEN, metavar="FRAMES",
                   help="mutual: until a camera's bank holds FRAMES frames its frames are scored "
                        "against what there is and all go to review, for a person to decide; "
                        "patch-knn with --stream-bank: the bank is consulted once it holds FRAMES "
                        f"frames ({_default('warmup')})")
    g.add_argument("--stream-bank", type=int, default=_NOT_GIVEN, metavar="FRAMES",
                   help="patch-knn: also compare each frame with its camera's last FRAMES frames "
                        "that the references alone did not alert on (the line's own normal "
                        "variety: stains, grain, pose); "
                        "a patch scores the lower of its distance to the references and its bank "
                        "score (MuSc's), so no frame scores higher than against the references and "
                        "calibrated thresholds keep their bound. Magnetic tile, 4 shots, a stream "
                        "with 5%% defects: image AUROC 0.87 -> 0.91 for about 50 ms more a frame "
                        "on 2 cores (README). A worker's scores then depend on the frames before: "
                        "`linewatch evaluate --protocol stream` measures it on a line "
                        f"({_default('stream_bank')}: off)")
    g.add_argument("--tiling", action=argparse.BooleanOptionalAction, default=_NOT_GIVEN,
                   help="patch-knn and mutual: cut frames whose long side is 1.5x the short side "
                        "or more into near-square tiles along the long side, each scored at model "
                        "resolution (at most 8; one backbone pass each), and join their maps; --no-tiling "
                        "squashes every frame into one square. Profiles calibrated before tiling "
                        "existed keep squashing (default: on)")
    g.add_argument("--precision", default=_NOT_GIVEN, choices=PRECISIONS,
                   help="fp32 is exact. bf16/fp16 (openclip: backbones) are for GPUs and slower than "
                        "fp32 on most CPUs; int8 (openclip: and dinov2-s) runs the image tower's "
                        "matrix products in int8 on CPU, about 1.5x faster, scores slightly "
                        "different: calibrate at the precision you score at "
                        f"({_default('precision')})")
    g.add_argument("--zoom", action=argparse.BooleanOptionalAction, default=_NOT_GIVEN,
                   help="ROI zoom (patch-knn): re-score crops of the hottest regions, cut from the "
                        "full-resolution frame, against crop-level references; a worker zooms only "
                        "frames at or above its review threshold (same decisions) (default: off)")
    g.add_argument("--zoom-top-k", type=int, default=_NOT_GIVEN,
                   help=f"with --zoom: regions per frame ({_default('zoom_top_k')})")
    g.add_argument("--zoom-crop", type=float, default=_NOT_GIVEN,
                   help=f"with --zoom: crop size as a fraction of the frame side ({_default('zoom_crop')})")
    g.add_argument("--memory-tolerance", type=float, default=_NOT_GIVEN, metavar="DIST",
                   help="patch-knn and mutual: each frame added to the memory after the first "
                        "(references, their rotated views, zoom crops, operators' confirmed "
                        "normals) keeps only its "
                        "patches farther than DIST (cosine distance) from every patch already "
                        "there, so a line that learns hundreds of normals of an object stays "
                        "fast; scores can only rise, by little. Textures' patches are all new: "
                        "they keep everything (a refit stops searching once 8 frames in a row were "
                        "90%% new); see the README's memory table. 0 keeps every patch "
                        "(default: "
                        + ", ".join(f"{v:g} for {k}" for k, v in MEMORY_TOLERANCE_DEFAULTS.items())
                        + ", 0 for other backbones)")
    g.add_argument("--adapt-steps", type=int, default=_NOT_GIVEN, metavar="N",
                   help="patch-knn: train a small contrastive head on pseudo-anomalies of the "
                        "references for N steps before fitting (0 = off, the default: it did not "
                        "help in the measurements in the README)")
    if vocabulary:
        g.add_argument("--defect-vocabulary", dest="vocabulary", type=_words, default=_NOT_GIVEN,
                       metavar="WORDS",
                       help="comma-separated defect words scored on each flagged region with the "
                            "CLIP text model (openclip: backbones; default: scratch, crack, dent, "
                            "contamination, missing part, discolouration, hole, stain, deformation, "
                            "foreign object)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default: %(default)s)")


_FIELDS = tuple(f for f in ScorerSettings.__dataclass_fields__)


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def scorer_options(a: argparse.Namespace) -> dict[str, Any]:
    """The model flags that were given, by ScorerSettings field name: a --preset's options,
    with flags typed beside it overriding them."""
    preset = dict(PRESETS[a.preset]) if getattr(a, "preset", None) else {}
    return {**preset, **{k: getattr(a, k) for k in _FIELDS if hasattr(a, k)}}


def scorer_settings(a: argparse.Namespace) -> ScorerSettings:
    try:
        return ScorerSettings(**scorer_options(a))
    except SettingsError as exc:
        preset = getattr(a, "preset", None)
        raise CliError(f"{exc} (--preset {preset} gives {', '.join(map(flag_name, PRESETS[preset]))})"
                       if preset else str(exc)) from None


def build_scorer(settings: ScorerSettings, device: str):
    from inference.backbones import BackboneUnavailable
    from inference.clip import ClipUnavailable

    try:
        return settings.build(device)
    except (BackboneUnavailable, ClipUnavailable, ValueError) as exc:
        raise CliError(str(exc)) from None


def _int_list(what: str, example: str):
    """An argparse type for comma-separated whole numbers, naming ``what`` when it is not."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {what}, "
                                             f"e.g. {example}") from None
    return parse


_layers = _int_list("block numbers", "5,8")
_sizes = _int_list("odd neighbourhood sizes", "1,3")


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def add_commands(sub: Any) -> None:
    from linewatch.evaluate import FEWSHOT_CALIBRATION, MT_STREAM_NORMALS, STREAM_DEFECT_RATE

    e = sub.add_parser("evaluate", formatter_class=FMT,
                       help="measure a method's quality on a labelled dataset folder",
                       description="Fit on SHOTS normal images drawn at random (once per seed), score "
                                   "the test set, and report image AUROC / AP / F1-max and pixel "
                                   "AUROC / PRO (to FPR 0.3) / F1-max as mean +- std over seeds, "
                                   "with a ROC plot and a heatmap-overlay grid.\n\n"
                                   "--data takes an MVTec AD category folder (train/good, test, "
                                   "ground_truth) or the magnetic-tile dataset (MT_Free/Imgs, "
                                   "MT_<Defect>/Imgs; test = all defects + 150 fixed unseen MT_Free).",
                       epilog="example:\n  linewatch evaluate --data ../shared/data/mvtec_ad/bottle "
                              "--method patch-knn --backbone dinov2-s --shots 1 --seeds 3 "
                              "--json out/bottle.json\n  linewatch evaluate --data "
                              "../shared/data/magnetic_tile --method mutual --shots 0 --protocol stream")
    e.add_argument("--data", required=True, metavar="DIR", help="dataset folder (see above)")
    model_args(e)
    e.add_argument("--shots", type=int, default=1,
                   help="normal reference images; 0 with --method mutual (or winclip): zero-shot, "
                        "no references (default: %(default)s)")
    e.add_argument("--protocol", choices=("batch", "stream"), default="batch",
                   help="batch: the test set, scored as a set (zero-shot mutual: the test set scores "
                        "itself, all at once, as MuSc measures). stream: a line's frames in a random "
                        "order per seed, as a worker meets them (printed). Zero-shot (--method mutual "
                        "--shots 0): each frame scored only against those before it (magnetic tile: "
                        f"a fixed draw of {MT_STREAM_NORMALS} MT_Free images with defects mixed in at "
                        f"{STREAM_DEFECT_RATE:.0%}%; MVTec: the test set). Few-shot (patch-knn): the "
                        "normal photos (MVTec train/good and test/good) with defects mixed in at "
                        f"{STREAM_DEFECT_RATE:.0%}%, less each draw's references and --calibration "
                        "normals, which set the alert threshold as calibrate does; frames come "
                        "--batch-size at a time and, with --stream-bank, what the references alone "
                        "do not alert on joins the camera's bank after each batch, as a worker "
                        "commits it (default: %(default)s)")
    e.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="few-shot --protocol stream: held-out normals per draw that set the alert "
                        f"threshold, which decides what enters the bank (default: {FEWSHOT_CALIBRATION})")
    e.add_argument("--expected-anomaly-rate", type=float, default=None, metavar="RATE",
                   help="zero-shot --protocol stream: the stated maximum share of defective frames that sets "
                        "the stream's own uncalibrated alert threshold, which decides what enters "
                        f"the bank (default: {STREAM_DEFECT_RATE})")
    e.add_argument("--seeds", type=int, default=3,
                   help="how many random reference draws (seeds 0..S-1) (default: %(default)s)")
    e.add_argument("--defect-types", default=None,
                   help="comma-separated defect folders to keep, e.g. broken_small (default: all)")
    e.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    e.add_argument("--plots", metavar="DIR", default=None,
                   help="write the ROC plot and overlay grid here (default: beside --json)")
    e.add_argument("--batch-size", type=int, default=8,
                   help="frames per backbone call; few-shot --protocol stream: the worker's batch "
                        "(its --max-batch); zero-shot --protocol stream scores one at a time, as a "
                        "paced camera delivers them (default: %(default)s)")
    e.add_argument("--eval-size", type=int, default=256,
                   help="pixel metrics at this longer side (default: %(default)s)")
    e.add_argument("--torch-threads", type=int, default=None)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(run=cmd_evaluate)

    t = sub.add_parser("train-prompts", formatter_class=FMT,
                       help="learn AnomalyCLIP's object-agnostic prompts on a dataset with masks",
                       description="Learn AnomalyCLIP's prompts, as the paper builds them: two "
                                   "contexts (normal: '[ctx] object.', abnormal: '[ctx] damaged "
                                   "object.'), deep prompts in the next text blocks, and DPAM's "
                                   "value-value attention path for the patch tokens, on an auxiliary "
                                   "dataset with defect masks, CLIP frozen: the image-level "
                                   "cross-entropy plus the pixel-level focal and dice losses. Train on "
                                   "other products than the ones you will inspect: the prompts are "
                                   "meant to be object-agnostic. Writes a safetensors prompt file "
                                   "for `--method anomalyclip --prompts FILE`. --convert instead "
                                   "turns a torch checkpoint of prompts into one (read weights-only: "
                                   "no code in it runs).",
                       epilog="example:\n  linewatch train-prompts --data /data/visa/pcb1 --backbone "
                              "openclip:ViT-B-16-plus-240 --weights vit_b16_plus.bin --out prompts."
                              "safetensors")
    t.add_argument("--data", metavar="DIR",
                   help="auxiliary dataset with masks (an MVTec AD category layout or magnetic tile): "
                        "every test image, normal and defective, is a training sample")
    t.add_argument("--backbone", required=True, metavar="openclip:ARCH")
    t.add_argument("--weights", default=None, metavar="PATH", help="the CLIP weights file")
    t.add_argument("--random-init", action="store_true",
                   help="random CLIP weights (tests and mechanism checks, never for quality)")
    t.add_argument("--out", required=True, metavar="FILE", help="prompt file to write (.safetensors)")
    t.add_argument("--convert", metavar="CHECKPOINT", default=None,
                   help="convert this torch checkpoint of prompts instead of training (a released "
                        "AnomalyCLIP checkpoint, e.g. 9_12_4_multiscale/epoch_15.pth, for "
                        "openclip:ViT-L-14-336-quickgelu with OpenAI's weights)")
    t.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="train at this resolution instead of the CLIP's own (a multiple of its patch "
                        "size; the paper trains at 518)")
    t.add_argument("--dpam-from", type=int, default=None, metavar="BLOCK",
                   help="first image block of DPAM's value-value attention path (0 = no DPAM; "
                        "default: a quarter of the way in, block 6 of ViT-L's 24 as AnomalyCLIP's "
                        "code): used to train, or stored with a converted AnomalyCLIP checkpoint")
    for flag, kind, default, what in TRAIN_PROMPT_FLAGS:
        t.add_argument(flag, type=kind, default=None,
                       help=what if default is None else f"{what} (default: {default})")
    t.add_argument("--torch-threads", type=int, default=None)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=cmd_train_prompts)

    c = sub.add_parser("calibrate", formatter_class=FMT,
                       help="build a line profile from normal images (references + thresholds)",
                       description="Split normal images (seeded) into --shots references, a "
                                   "calibration set that sets the thresholds and a test set on which "
                                   "the false-alarm and review rates are measured; estimate recall on "
                                   "pseudo-anomalies (local augmentation, CutPaste baseline); save the "
                                   "profile as PROFILE.safetensors + PROFILE.json (no pickle). The "
                                   "profile records every model option, and workers load it with "
                                   "--profile (and reload it when it changes) with those options.")
    c.add_argument("--normals", required=True, metavar="DIR", help="folder of normal images of this line")
    c.add_argument("--shots", type=int, default=4, help="reference images (default: %(default)s)")
    c.add_argument("--out", required=True, metavar="PROFILE",
                   help="profile path without suffix (writes PROFILE.json and PROFILE.safetensors)")
    model_args(c, vocabulary=True)
    c.add_argument("--false-alarm-rate", type=float, default=0.01,
                   help="target alert rate on normal frames (default: %(default)s)")
    c.add_argument("--review-rate", type=float, default=0.1,
                   help="target rate of normal frames flagged for review or alert (default: %(default)s)")
    c.add_argument("--pseudo", type=int, default=100,
                   help="pseudo-anomalies per method for the recall estimate (0 = none; "
                        "default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="split and pseudo-anomaly seed (default: %(default)s)")
    c.add_argument("--torch-threads", type=int, default=None)
    c.add_argument("--json", metavar="PATH", default=None, help="also write the measured rates as JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(run=cmd_calibrate)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from linewatch.evaluate import (
        FEWSHOT_CALIBRATION,
        STREAM_DEFECT_RATE,
        DatasetError,
        load_split,
        run_evaluation,
        table,
    )
    from linewatch.images import ImageReadError

    settings = scorer_settings(a)
    if settings.method == "noop":
        raise CliError("evaluating 'noop' measures nothing; pick patch-knn, winclip or winclip+")
    if a.shots < 0 or (a.shots == 0 and settings.method not in ZERO_SHOT):
        raise CliError(f"--shots must be >= 1 for {settings.method} (0 is zero-shot: --method "
                       f"{', '.join(ZERO_SHOT)})")
    if a.shots > 0 and settings.method in ("winclip", "anomalyclip"):
        raise CliError(f"{settings.method} is zero-shot and would ignore references: --shots 0")
    if settings.method == "mutual" and a.shots == 0 and settings.memory_tolerance is not None:
        raise CliError("--memory-tolerance filters the memory of confirmed normals, and zero-shot "
                       "mutual scoring (--shots 0) has none: remove it, or give --shots")
    if a.protocol == "stream" and a.shots == 0 and settings.method != "mutual":
        raise CliError("the zero-shot --protocol stream scores each frame against those before it: "
                       "use it with --method mutual")
    if a.protocol == "stream" and a.shots > 0 and settings.method != "patch-knn":
        raise CliError(f"the few-shot --protocol stream is measured for --method patch-knn, not "
                       f"{settings.method}: use --protocol batch")
    if settings.stream_bank and a.protocol != "stream":
        raise CliError("--stream-bank compares each frame with its camera's frames before it, and "
                       "the batch protocol scores the test set as a set, so it would be ignored: add "
                       "--protocol stream")
    if a.calibration is not None and a.protocol != "stream":
        raise CliError("--calibration sets the few-shot stream's alert threshold: add --protocol stream")
    if a.calibration is not None and a.shots == 0:
        raise CliError("--calibration sets the few-shot stream's alert threshold from normals held "
                       "out of the references, and --shots 0 has none (the zero-shot stream sets "
                       "its own from --expected-anomaly-rate): remove it, or give --shots")
    calibration = FEWSHOT_CALIBRATION if a.calibration is None else a.calibration
    if calibration < 2:
        raise CliError(f"--calibration {calibration}: at least 2 held-out normals")
    if a.expected_anomaly_rate is not None and not (a.protocol == "stream" and a.shots == 0):
        raise CliError("--expected-anomaly-rate sets the zero-shot stream's own thresholds: use it "
                       "with --protocol stream --shots 0 (the few-shot stream's come from "
                       "--calibration normals)")
    if a.batch_size < 1 or a.seeds < 1:
        raise CliError(f"--batch-size {a.batch_size}, --seeds {a.seeds}: both must be >= 1")
    set_torch_threads(a.torch_threads)
    try:
        split = load_split(a.data, a.defect_types.split(",") if a.defect_types else None)
    except DatasetError as exc:
        raise CliError(str(exc)) from None
    if a.protocol == "stream" and a.shots > 0 and a.shots + calibration > len(split.candidates):
        raise CliError(f"--shots {a.shots} + --calibration {calibration} normals per draw, but "
                       f"{split.name} has {len(split.candidates)} normals to draw from: lower one")
    scorer = build_scorer(settings, a.device)
    if settings.method == "mutual" and a.shots == 0 and a.protocol == "batch" and a.seeds > 1:
        print(f"batch protocol: every image against all the others, the same for every seed; one "
              f"run, not {a.seeds}", file=sys.stderr)
        a.seeds = 1
    json_path = Path(a.json) if a.json else None
    plots = Path(a.plots) if a.plots else (json_path.parent if json_path else None)
    config = {**scorer.settings.to_dict(), "backbone": settings.resolved_backbone, "shots": a.shots,
              "device": a.device, "batch_size": a.batch_size}
    if a.protocol == "stream" and a.shots == 0:
        from linewatch.evaluate import describe_stream, stream_frames

        print(f"{split.name} ({split.layout}), zero-shot stream: {describe_stream(stream_frames(split))}; "
              f"{settings.method} on {settings.resolved_backbone}, orders 0..{a.seeds - 1}", file=sys.stderr)
    elif a.protocol == "stream":
        from linewatch.evaluate import describe_stream, fewshot_stream_frames

        print(f"{split.name} ({split.layout}), few-shot stream: "
              f"{describe_stream(fewshot_stream_frames(split))}, less each draw's {a.shots} references "
              f"and {calibration} calibration normals; {settings.method} on "
              f"{settings.resolved_backbone}, {a.shots}-shot, camera bank "
              f"{settings.stream_bank or 'off'}, seeds 0..{a.seeds - 1}", file=sys.stderr)
    else:
        print(f"{split.name} ({split.layout}): {len(split.test)} test images, "
              f"{sum(s.defect for s in split.test)} defective; {settings.method} on "
              f"{settings.resolved_backbone}, {a.shots}-shot"
              + (" (batch: the test set scores itself; the same for every seed)"
                 if a.shots == 0 and settings.method == "mutual" else
                 f", seeds 0..{a.seeds - 1}"), file=sys.stderr)
    try:
        summary = run_evaluation(scorer, split, shots=a.shots, seeds=range(a.seeds), config=config,
                                 json_path=json_path, plots_dir=plots, batch_size=a.batch_size,
                                 eval_size=a.eval_size, progress=not a.no_progress,
                                 protocol=a.protocol, calibration=calibration,
                                 expected_anomaly_rate=(STREAM_DEFECT_RATE if a.expected_anomaly_rate is None
                                                        else a.expected_anomaly_rate))
    except (DatasetError, ImageReadError) as exc:
        raise CliError(str(exc)) from None
    print(table(summary))
    for k, v in summary.get("plots", {}).items():
        print(f"{k}: {v}")
    if "warmup_frames" in summary:
        print(f"stream: {summary['stream']}; metrics over the frames after the first "
              f"{summary['warmup_frames']} (the warm-up)")
    elif "stream" in summary:
        print(f"stream: {summary['stream']} (seed 0's frames); every frame counts")
    if json_path:
        print(f"json: {json_path}")
    return 0


def cmd_train_prompts(a: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np
    from tqdm import tqdm

    from inference.anomalyclip import (
        PromptError,
        convert_checkpoint,
        paper_design,
        save_prompts,
        train_prompts,
    )
    from inference.clip import ClipUnavailable, OpenCLIPBackbone
    from linewatch.evaluate import DatasetError, load_split, read_mask
    from linewatch.images import ImageReadError, read_rgb

    if not a.backbone.startswith("openclip:"):
        raise CliError(f"--backbone {a.backbone}: AnomalyCLIP prompts are learned for a CLIP model "
                       "(openclip:ARCH)")
    if (a.data is None) == (a.convert is None):
        raise CliError("give --data DIR to train, or --convert CHECKPOINT to convert (one of them)")
    given = [flag for flag, *_ in TRAIN_PROMPT_FLAGS if getattr(a, flag[2:].replace("-", "_")) is not None]
    if a.convert and (given or a.image_size is not None):
        flag = given[0] if given else "--image-size"
        raise CliError(f"{flag} sets training; --convert trains nothing: remove it")
    for flag, _, default, _ in TRAIN_PROMPT_FLAGS:
        name = flag[2:].replace("-", "_")
        setattr(a, name, default if getattr(a, name) is None else getattr(a, name))
    if a.dpam_from is not None and a.dpam_from < 0:
        raise CliError(f"--dpam-from {a.dpam_from}: an image block number, or 0 for no DPAM")
    if not Path(a.out).resolve().parent.is_dir():
        raise CliError(f"--out {a.out}: folder {Path(a.out).resolve().parent} does not exist")
    if a.deep_depth == 1 and "--deep-length" in given:
        raise CliError("--deep-length sets the deeper blocks' tokens; --deep-depth 1 has none: remove it")
    if min(a.steps, a.context, a.batch_size, 1 if a.deep_depth is None else a.deep_depth) < 1 or a.lr <= 0:
        raise CliError("--steps, --context, --deep-depth and --batch-size must be at least 1, "
                       "--lr above 0")
    set_torch_threads(a.torch_threads)
    try:
        bb = OpenCLIPBackbone(a.backbone.removeprefix("openclip:"), a.weights, random_init=a.random_init,
                              image_size=a.image_size)
    except ClipUnavailable as exc:
        raise CliError(str(exc)) from None
    if a.convert:
        try:
            learner = convert_checkpoint(a.convert, a.out, bb, dpam_from=a.dpam_from)
        except PromptError as exc:
            raise CliError(str(exc)) from None
        print(f"prompts: {a.out} (converted from {a.convert}; {learner.design})")
        return 0
    design = paper_design(bb)
    depth = design.deep_depth if a.deep_depth is None else a.deep_depth
    design = replace(design, n_ctx=a.context, deep_depth=depth,
                     deep_length=0 if depth == 1 else min(design.deep_length, a.context)
                     if a.deep_length is None else a.deep_length,
                     dpam_from=design.dpam_from if a.dpam_from is None else a.dpam_from)
    try:
        design.check(bb, "train-prompts")
    except PromptError as exc:
        raise CliError(f"{exc} (--context, --deep-depth, --deep-length, --dpam-from)") from None
    try:
        split = load_split(a.data)
        samples = split.test
        images = [read_rgb(s.path) for s in samples]
        masks = [read_mask(s, im.shape[:2]) for s, im in zip(samples, images, strict=True)]
    except (DatasetError, ImageReadError) as exc:
        raise CliError(str(exc)) from None
    print(f"{split.name}: {len(images)} images, {sum(s.defect for s in samples)} with defect masks; "
          f"{a.steps} steps on {a.backbone}; {design}", file=sys.stderr)
    bar = tqdm(total=a.steps, unit="step", desc="prompts", disable=a.no_progress)

    def step(_i: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)

    learner, report = train_prompts(bb, images, masks, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                                    design=design, seed=a.seed, on_step=step)
    bar.close()
    save_prompts(learner, a.out, bb.arch)
    first, last = np.mean(report.losses[:10]), np.mean(report.losses[-10:])
    print(f"loss {first:.4f} (first 10 steps) -> {last:.4f} (last 10)\nprompts: {a.out}")
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from inference.profile import LineProfile
    from linewatch.calibrate import calibrate_profile, report
    from linewatch.images import ImageReadError, load_folder

    settings = scorer_settings(a)
    if settings.method == "noop":
        raise CliError("'noop' scores nothing; calibrate patch-knn, winclip or winclip+")
    if settings.method == "mutual":
        raise CliError("mutual scoring needs no profile: start `linewatch worker --method mutual` with "
                       "no references; its thresholds come from each camera's own scores until "
                       "operators confirm normals. To calibrate a few-shot profile from normal "
                       "images, use patch-knn")
    if not 0 < a.false_alarm_rate < a.review_rate < 1:
        raise CliError("need 0 < --false-alarm-rate < --review-rate < 1")
    set_torch_threads(a.torch_threads)
    try:
        images = load_folder(a.normals, what="--normals")
    except ImageReadError as exc:
        raise CliError(str(exc)) from None
    scorer = build_scorer(settings, a.device)

    def bar(what: str, total: int):
        return tqdm(total=total, desc=what, unit="img", disable=a.no_progress, dynamic_ncols=True)

    try:
        profile = calibrate_profile(scorer, images, a.shots, a.false_alarm_rate, a.review_rate,
                                    seed=a.seed, pseudo=a.pseudo, progress=bar)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    path = profile.save(a.out)
    print(report(profile))
    print(f"profile written: {path} (+ {LineProfile.paths(a.out)[1].name})")
    if a.json:
        Path(a.json).write_text(json.dumps(profile.estimate, indent=2) + "\n")
    return 0
