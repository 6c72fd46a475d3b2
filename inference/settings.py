"""How a scorer is configured, written down once.

Every place that builds a scorer (the command line, ``calibrate``, ``evaluate``,
a worker loading a line profile, the benchmarks) goes through
:class:`ScorerSettings`: one typed object, one validation, one way to store it
in a profile and read it back. A profile records the settings its thresholds
were measured with, so a worker that loads the profile builds exactly that
scorer; an option that the chosen method or backbone would ignore is refused,
naming the option, instead of being accepted and silently doing nothing.

Device (``cpu``, ``cuda:0``) is not a setting: it is where a scorer runs, not
what it computes, and the same profile runs on either.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

METHODS = ("patch-knn", "mutual", "winclip", "winclip+", "anomalyclip", "noop")
VISUAL_BACKBONES = ("dinov2-s", "efficientnet-lite0")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
AUGMENTS = ("none", "rotate", "rotate+flip")
# patch-knn: each frame also scored as other views of it (scoring.TEST_VIEW_FLIPS), maps averaged
TEST_VIEWS = ("none", "flips")
# how a mutual scorer scored a frame (ScoreResult.mode; a worker's mode gauge)
MUTUAL_MODES = ("warm-up", "mutual", "few-shot")
# a visual backbone's resolution and compared layers when not given (DINOv2 blocks, timm stages)
BACKBONE_DEFAULTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "dinov2-s": (224, (5, 8)), "efficientnet-lite0": (256, (2, 3))}
# the novelty filter on a learned normal's patches (scoring.novel_rows; patch-knn's memory and
# mutual scoring's few-shot one) when not given: a cosine distance, so it means something
# different on each backbone's feature space; measured for dinov2-s only (README: "A line that
# learns", and mutual's few-shot memory), exact (0: every patch kept) elsewhere
MEMORY_TOLERANCE_DEFAULTS: dict[str, float] = {"dinov2-s": 0.02}
MAX_MEMORY_TOLERANCE = 0.5  # beyond, "near" covers patches that have little in common
MAX_STREAM_BANK = 256  # frames a camera's bank may hold (--stream-bank): memory and matching grow with it
DEFAULT_BACKBONE = {"patch-knn": "dinov2-s", "mutual": "dinov2-s", "winclip": "openclip:ViT-B-16-plus-240",
                    "winclip+": "openclip:ViT-B-16-plus-240", "anomalyclip": "openclip:ViT-B-16-plus-240"}


# Named sets of settings, for where the defaults' budget (2 CPU cores, ~70 ms a frame) is not
# the limit. "quality": a GPU's choice, measured in the README's technique table (2.2-3.4x
# the defaults' compute on CPU): 336 px was better than 224 on both datasets and as good as or
# better than 448. Neighbourhood aggregation is not in it: it sharpens maps of objects and
# costs textures 0.02-0.08 image AUROC. Nor are test-time views (test_views "flips"): at 336 px
# they measured pixel AUROC and PRO +0.01 on the magnetic tiles, image AUROC within the draws'
# spread, nothing on the bottle, for 4 backbone passes a frame, and the GPU figures of the
# preset were measured without them. A preset is only a shorthand: profiles store the
# settings it gave.
PRESETS: dict[str, dict[str, Any]] = {
    "quality": {"image_size": 336},
}


class SettingsError(ValueError):
    """Settings that cannot build a scorer, or that contain an option nothing would use."""


def flag_name(setting: str) -> str:
    """The command-line flag of a setting, for messages: ``zoom_top_k`` -> ``--zoom-top-k``."""
    return "--defect-vocabulary" if setting == "vocabulary" else "--" + setting.replace("_", "-")


@dataclass(frozen=True)
class ScorerSettings:
    """What decides a scorer's numbers. Defaults here are the only defaults."""

    method: str = "patch-knn"
    backbone: str | None = None  # None: the method's default (DEFAULT_BACKBONE)
    weights: str | None = None  # local weights file; dinov2-s and efficientnet-lite0 have packaged ones
    image_size: int | None = None  # visual backbones only; None: the backbone's default
    layers: tuple[int, ...] | None = None  # visual backbones only; None: the backbone's default
    random_init: bool = False  # openclip: only; random weights, for tests and benchmarks
    precision: str = "fp32"
    reference_augment: str = "none"  # patch-knn only
    # patch-knn: r x r neighbourhood means side by side; mutual: each r scored, scores averaged
    aggregate: tuple[int, ...] = (1,)
    tiling: bool = True  # patch-knn and mutual: frames far from square scored as tiles (scoring.tile_grid)
    bank_size: int = 32  # mutual only: recent frames per camera each frame is scored against
    warmup: int = 8  # mutual: a camera's frames go to review until its bank holds this many;
    # patch-knn with stream_bank: the bank is consulted once it holds this many
    stream_bank: int = 0  # patch-knn: recent frames per camera compared beside the references; 0 off
    # patch-knn and mutual (its few-shot memory): a learned normal's patches within this cosine
    # distance of the memory are not added (scoring.novel_rows); 0 keeps every patch; None: the
    # backbone's default (MEMORY_TOLERANCE_DEFAULTS)
    memory_tolerance: float | None = None
    test_views: str = "none"  # patch-knn only: "flips" scores each frame in 4 views (scoring.TEST_VIEW_FLIPS)
    zoom: bool = False  # patch-knn only
    zoom_top_k: int = 2
    zoom_crop: float = 0.35
    adapt_steps: int = 0  # patch-knn only
    prompts: str | None = None  # anomalyclip only, required: learned prompts (linewatch train-prompts)
    class_name: str = "object"  # CLIP text prompts and defect words
    vocabulary: tuple[str, ...] | None = field(default=None)  # defect words; None: the default list

    def __post_init__(self) -> None:
        for name, kind in _TYPES.items():  # settings also come from profile files: check types
            v = getattr(self, name)
            if name in _LISTS and v is not None:
                if not isinstance(v, list | tuple) or not all(
                        isinstance(x, kind) and not isinstance(x, bool) for x in v):
                    raise SettingsError(f"{flag_name(name)}: expected a list of {_type_name(kind)}, "
                                        f"got {v!r}")
                object.__setattr__(self, name, tuple(v))
            elif v is not None or name not in _OPTIONAL:
                ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
                if not ok:
                    raise SettingsError(f"{flag_name(name)}: expected {_type_name(kind)}, got {v!r}")
        self.validate()

    # -- validation: one place, every combination ----------------------------------------
    @property
    def resolved_backbone(self) -> str | None:
        return self.backbone or DEFAULT_BACKBONE.get(self.method)

    def resolved(self) -> ScorerSettings:
        """The same scorer with every default spelled out (backbone, image size, layers), so
        two settings that build the same scorer compare equal."""
        bb = self.resolved_backbone
        if self.method == "noop" or bb is None:
            return self
        size, layers = BACKBONE_DEFAULTS.get(bb, (None, None))
        tolerance = self.memory_tolerance
        if tolerance is None and self.method in ("patch-knn", "mutual"):
            tolerance = MEMORY_TOLERANCE_DEFAULTS.get(bb, 0.0)
        return dataclasses.replace(self, backbone=bb, image_size=self.image_size or size,
                                   layers=self.layers or layers, memory_tolerance=tolerance)

    @property
    def clip(self) -> bool:
        """Whether the backbone has a CLIP text tower (prompts, defect words)."""
        return (self.resolved_backbone or "").startswith("openclip:")

    def _changed(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "method"
                and getattr(self, f.name) != f.default]

    def validate(self) -> None:
        """Refuse what cannot work and what would be ignored, naming the option."""
        m = self.method
        if m not in METHODS:
            raise SettingsError(f"unknown scorer {m!r}; choose one of {', '.join(METHODS)}")
        if m == "noop":
            if self._changed():
                raise SettingsError(f"the noop scorer scores nothing, so {flag_name(self._changed()[0])} "
                                    "would do nothing; remove it")
            return
        bb = self.resolved_backbone or ""
        if not (bb in VISUAL_BACKBONES or (bb.startswith("openclip:") and len(bb) > 9)):
            raise SettingsError(f"unknown backbone {bb!r}; choose dinov2-s, efficientnet-lite0 or "
                                "openclip:ARCH")
        if m == "mutual" and bb != "dinov2-s":
            raise SettingsError(f"mutual scoring is implemented for dinov2-s (each block scored "
                                f"on its own), not {bb!r}")
        if m not in ("patch-knn", "mutual") and not self.clip:
            raise SettingsError(f"{m} needs a CLIP backbone with a text encoder (openclip:ARCH), "
                                f"not {bb!r}; use patch-knn for visual-only backbones")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.test_views not in TEST_VIEWS:
            raise SettingsError(f"--test-views {self.test_views!r}: choose one of {', '.join(TEST_VIEWS)}")
        if self.reference_augment not in AUGMENTS:
            raise SettingsError(f"--reference-augment {self.reference_augment!r}: choose one of "
                                f"{', '.join(AUGMENTS)}")
        ignored = {  # option -> why the chosen scorer would ignore it
            "image_size": "a CLIP backbone works at its own resolution (anomalyclip excepted)"
                          if self.clip and m != "anomalyclip" else None,
            "layers": "a CLIP backbone's layers are fixed by the method" if self.clip else None,
            "random_init": None if self.clip else f"{bb} loads its packaged weights; random "
                                                  "initialisation is implemented for openclip: backbones",
            "reference_augment": None if m == "patch-knn" else "reference augmentation is "
                                                               "implemented for patch-knn",
            "zoom": None if m == "patch-knn" else "ROI zoom is implemented for patch-knn",
            "test_views": None if m == "patch-knn" else "test-time views are implemented for patch-knn",
            "tiling": None if m in ("patch-knn", "mutual") else "tiled scoring is implemented for "
                                                                 "patch-knn and mutual",
            "aggregate": None if m in ("patch-knn", "mutual") else "neighbourhood aggregation is "
                                                                   "implemented for patch-knn and mutual",
            "bank_size": None if m == "mutual" else "the frame bank is mutual scoring's (patch-knn: "
                                                    "--stream-bank)",
            "stream_bank": None if m == "patch-knn" else "a bank beside the references is patch-knn's "
                                                        "(mutual: --bank-size)",
            "prompts": None if m == "anomalyclip" else "learned prompts are AnomalyCLIP's",
            "warmup": None if m == "mutual" or (m == "patch-knn" and self.stream_bank) else
                      "the warm-up is mutual scoring's and --stream-bank's",
            "adapt_steps": None if m == "patch-knn" else "adaptation is implemented for patch-knn",
            "memory_tolerance": None if m in ("patch-knn", "mutual") else "the novelty filter on the "
                                                                          "memory is implemented for "
                                                                          "patch-knn and mutual",
            "zoom_top_k": None if self.zoom else "it sets how ROI zoom works; add --zoom",
            "zoom_crop": None if self.zoom else "it sets how ROI zoom works; add --zoom",
            "class_name": (f"{bb} has no text model to put it in a prompt" if not self.clip else
                           "AnomalyCLIP's prompts are object-agnostic" if m == "anomalyclip" else None),
            "vocabulary": None if self.clip else f"{bb} has no text model to score defect words",
        }
        for name in self._changed():
            if ignored.get(name):
                raise SettingsError(f"{flag_name(name)} would be ignored: {ignored[name]}; remove it")
        if self.precision in ("bf16", "fp16") and not self.clip:
            raise SettingsError(f"--precision {self.precision} is implemented for openclip: "
                                f"backbones; {bb} runs in fp32 (or int8 on CPU for dinov2-s)")
        if self.precision == "int8" and bb == "efficientnet-lite0":
            raise SettingsError("--precision int8 is implemented for the ViT backbones (dinov2-s, "
                                "openclip:); efficientnet-lite0 runs in fp32")
        if self.image_size is not None and self.image_size < 14:
            raise SettingsError(f"--image-size {self.image_size} is too small (at least 14)")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise SettingsError(f"--layers {self.layers}: give block indices >= 0, e.g. 5,8")
        if self.zoom and not (self.zoom_top_k >= 1 and 0.05 <= self.zoom_crop <= 0.9):
            raise SettingsError(f"--zoom-top-k {self.zoom_top_k} / --zoom-crop {self.zoom_crop}: "
                                "need at least 1 region, and a crop of 0.05 to 0.9 of the frame side")
        if (not self.aggregate or len(set(self.aggregate)) != len(self.aggregate)
                or any(r < 1 or r > 7 or r % 2 == 0 for r in self.aggregate)):
            raise SettingsError(f"--aggregate {','.join(map(str, self.aggregate))}: give distinct odd "
                                "neighbourhood sizes from 1 to 7, e.g. 1,3")
        if m == "anomalyclip" and not self.prompts:
            raise SettingsError("anomalyclip needs --prompts FILE: learned prompts from `linewatch "
                                "train-prompts` (or a converted AnomalyCLIP checkpoint)")
        if m == "mutual" and not 2 <= self.warmup <= self.bank_size:
            raise SettingsError(f"--warmup {self.warmup} / --bank-size {self.bank_size}: need "
                                "2 <= warmup <= bank size (a frame needs others to be compared with)")
        if self.stream_bank < 0:
            raise SettingsError(f"--stream-bank {self.stream_bank}: give 0 (off) or a number of frames")
        if self.stream_bank > MAX_STREAM_BANK:
            raise SettingsError(f"--stream-bank {self.stream_bank}: at most {MAX_STREAM_BANK} frames (each "
                                "camera keeps them all, about 0.4 MB a frame at 224 px, and matches "
                                "every frame against them)")
        if self.stream_bank and not 2 <= self.warmup <= self.stream_bank:
            raise SettingsError(f"--stream-bank {self.stream_bank} / --warmup {self.warmup}: need "
                                "2 <= warmup <= stream bank (the bank is consulted once it holds "
                                "--warmup frames)")
        if self.test_views != "none" and (self.zoom or self.adapt_steps or self.stream_bank):
            other = "--zoom" if self.zoom else "--adapt-steps" if self.adapt_steps else "--stream-bank"
            raise SettingsError(f"--test-views {self.test_views} does not go with {other}: it is "
                                "implemented for plain patch-knn (zoom's crops, a trained head and "
                                "a camera's bank each see one view of a frame)")
        if self.stream_bank and (self.zoom or self.adapt_steps):
            other = "--zoom" if self.zoom else "--adapt-steps"
            raise SettingsError(f"--stream-bank does not go with {other}: it is implemented for "
                                "plain patch-knn (zoom keeps two memories, a trained head changes "
                                "the features the bank holds)")
        if self.memory_tolerance is not None and not 0.0 <= self.memory_tolerance <= MAX_MEMORY_TOLERANCE:
            raise SettingsError(f"--memory-tolerance {self.memory_tolerance}: give a cosine distance "
                                f"from 0 (keep every patch) to {MAX_MEMORY_TOLERANCE}")
        if self.adapt_steps < 0:
            raise SettingsError(f"--adapt-steps {self.adapt_steps}: must be >= 0")
        if self.vocabulary is not None and len([w for w in self.vocabulary if w.strip()]) < 2:
            raise SettingsError(f"--defect-vocabulary {','.join(self.vocabulary)!r}: give at least two "
                                "comma-separated words (each region gets the best-matching ones)")
        if not self.class_name.strip():
            raise SettingsError("--class-name is empty")

    # -- building ------------------------------------------------------------------------
    def build(self, device: str = "cpu"):
        """The scorer these settings describe, on ``device`` (not yet fitted)."""
        from inference import _build

        return _build(self, device)

    # -- storing in a profile ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in _LISTS:
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScorerSettings:
        """Read settings back from a profile; an unknown key is an error (a newer linewatch
        wrote it, and ignoring it would score differently from what was calibrated)."""
        if not isinstance(d, Mapping):
            raise SettingsError("scorer settings must be a mapping")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SettingsError(f"unknown scorer setting(s) {', '.join(unknown)}: written by a "
                                "newer linewatch? Upgrade, or calibrate again with this one")
        if d.get("method", cls.method) == "patch-knn":  # settings that came after it was written
            d = {**_BEFORE_THEY_EXISTED, **d}
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as exc:  # SettingsError is a ValueError: kept as it is
            if isinstance(exc, SettingsError):
                raise
            raise SettingsError(f"scorer settings: {exc}") from None

    @classmethod
    def from_legacy_dict(cls, d: Mapping[str, Any]) -> tuple[ScorerSettings, list[str]]:
        """Settings from a profile written before settings were validated (schema 1): options
        the scorer ignored were recorded anyway (``class_name`` for every method, ``layers``
        for CLIP backbones); they are dropped, as the worker then ignored them. Returns the
        settings and the names dropped."""
        if not isinstance(d, Mapping):
            raise SettingsError("scorer settings must be a mapping")
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        core = ("method", "backbone", "weights", "precision", "random_init", "zoom", "adapt_steps")
        kept = {k: d[k] for k in core if k in d}
        base = cls.from_dict(kept)
        dropped: list[str] = []
        for k in d.keys() - kept.keys():
            try:
                base = dataclasses.replace(base, **{k: d[k]})
            except SettingsError:
                dropped.append(k)
        return base, sorted(dropped)

    def differences(self, other: ScorerSettings) -> list[str]:
        """Option names whose values differ (for a flag that conflicts with a profile)."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]



_TYPES: dict[str, Any] = {
    "method": str, "backbone": str, "weights": str, "image_size": int, "layers": int,
    "random_init": bool, "precision": str, "reference_augment": str, "aggregate": int, "tiling": bool,
    "bank_size": int, "warmup": int, "stream_bank": int, "prompts": str, "memory_tolerance": int | float,
    "test_views": str, "zoom": bool,
    "zoom_top_k": int, "zoom_crop": int | float, "adapt_steps": int, "class_name": str,
    "vocabulary": str}
def _type_name(kind: Any) -> str:
    """``int``, or ``int or float`` for a union (which has no ``__name__``)."""
    return " or ".join(k.__name__ for k in typing.get_args(kind)) or kind.__name__


_LISTS = ("layers", "aggregate", "vocabulary")
_OPTIONAL = ("backbone", "weights", "image_size", "layers", "vocabulary", "prompts", "memory_tolerance")
DEFAULTS = ScorerSettings()
# what a setting added later meant for a profile written before it: that profile's thresholds
# were measured with squashed frames, so it keeps being scored that way
_BEFORE_THEY_EXISTED: dict[str, Any] = {"tiling": False, "memory_tolerance": 0.0}
