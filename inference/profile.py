"""A line profile: everything a worker needs to score one line, in a safe, versioned format.

``NAME.safetensors`` holds the arrays (reference images, operator-confirmed normals,
calibration scores, the drift reference); ``NAME.json`` holds the rest (scorer
settings, thresholds, the pseudo-anomaly recall estimate) and the SHA-256 of the
arrays file. No pickle anywhere: loading a profile cannot run code.

The JSON is written last, atomically, so a worker watching it never sees half a
profile: when the JSON changes and its checksum matches the arrays, the profile
is complete. Saving a loaded profile reproduces both files byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.calibration import Thresholds
from inference.settings import ScorerSettings, SettingsError

log = logging.getLogger(__name__)

PROFILE_SCHEMA = 2  # 2: the scorer settings are a validated ScorerSettings (1: a free-form dict)
SUPPORTED_PROFILE_SCHEMAS = frozenset({1, PROFILE_SCHEMA})


class ProfileError(RuntimeError):
    """A profile is missing, incomplete, corrupt or of an unknown version; says which file."""


@dataclass
class LineProfile:
    scorer: ScorerSettings                 # what built the scorer the thresholds were measured on
    references: list[np.ndarray]           # (H, W, 3) uint8 each
    thresholds: Thresholds
    false_alarm_rate: float
    review_rate: float
    calibration_scores: np.ndarray         # scores of the calibration normals, float64
    learned: list[np.ndarray] = field(default_factory=list)  # normals confirmed by operators
    drift: dict[str, np.ndarray] = field(default_factory=dict)  # DriftReference.to_arrays()
    estimate: dict[str, Any] = field(default_factory=dict)  # observed rates, pseudo-anomaly recall
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    schema: int = PROFILE_SCHEMA

    # -- files -------------------------------------------------------------------------------
    @staticmethod
    def paths(path: str | Path) -> tuple[Path, Path]:
        p = Path(path)
        base = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
        return base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"calibration_scores": np.asarray(self.calibration_scores, np.float64)}
        for i, im in enumerate(self.references):
            out[f"reference.{i:04d}"] = np.ascontiguousarray(im, dtype=np.uint8)
        for i, im in enumerate(self.learned):
            out[f"learned.{i:04d}"] = np.ascontiguousarray(im, dtype=np.uint8)
        for k, v in self.drift.items():
            out[k] = np.ascontiguousarray(v)
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``PATH.safetensors`` then ``PATH.json`` (atomically); returns the JSON path."""
        from safetensors.numpy import save

        jpath, apath = self.paths(path)
        jpath.parent.mkdir(parents=True, exist_ok=True)
        blob = save(self.arrays())
        _atomic_write(apath, blob)
        meta = {
            "schema": self.schema, "created": self.created, "scorer": self.scorer.to_dict(),
            "thresholds": {"alert": self.thresholds.alert, "review": self.thresholds.review,
                           "n_normals": self.thresholds.n_normals,
                           "guaranteed": self.thresholds.guaranteed},
            "false_alarm_rate": self.false_alarm_rate, "review_rate": self.review_rate,
            "estimate": self.estimate, "arrays": apath.name,
            "arrays_sha256": hashlib.sha256(blob).hexdigest(),
            "counts": {"references": len(self.references), "learned": len(self.learned)},
        }
        _atomic_write(jpath, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return jpath

    @classmethod
    def load(cls, path: str | Path) -> LineProfile:
        from safetensors.numpy import load

        jpath, apath = cls.paths(path)
        try:
            meta = json.loads(jpath.read_text())
        except FileNotFoundError:
            raise ProfileError(f"no profile at {jpath}: create one with `linewatch calibrate "
                               f"--normals DIR --out {jpath.with_suffix('')}`") from None
        except ValueError as exc:
            raise ProfileError(f"{jpath} is not valid JSON: {exc}") from None
        if meta.get("schema") not in SUPPORTED_PROFILE_SCHEMAS:
            raise ProfileError(f"{jpath} has profile schema {meta.get('schema')!r}; this linewatch reads "
                               f"{sorted(SUPPORTED_PROFILE_SCHEMAS)}. Recalibrate with this version.")
        apath = jpath.with_name(meta.get("arrays", apath.name))
        try:
            blob = apath.read_bytes()
        except FileNotFoundError:
            raise ProfileError(f"{jpath} names {apath}, which does not exist") from None
        if hashlib.sha256(blob).hexdigest() != meta.get("arrays_sha256"):
            raise ProfileError(f"{apath} does not match the checksum in {jpath}: the profile is "
                               "incomplete (being written?) or was altered; write it again")
        arrays = load(blob)
        t = meta["thresholds"]
        try:
            if meta["schema"] == 1:
                settings, dropped = ScorerSettings.from_legacy_dict(meta["scorer"])
                if dropped:
                    log.warning("%s (profile schema 1) records %s, which its scorer ignores; "
                                "left out (calibrate again to write schema %d)", jpath,
                                ", ".join(dropped), PROFILE_SCHEMA)
            else:
                settings = ScorerSettings.from_dict(meta["scorer"])
        except SettingsError as exc:
            raise ProfileError(f"{jpath}: {exc}") from None
        return cls(
            scorer=settings,
            references=[arrays[k] for k in sorted(arrays) if k.startswith("reference.")],
            learned=[arrays[k] for k in sorted(arrays) if k.startswith("learned.")],
            thresholds=Thresholds(float(t["alert"]), float(t["review"]), int(t["n_normals"]),
                                  bool(t["guaranteed"])),
            false_alarm_rate=float(meta["false_alarm_rate"]), review_rate=float(meta["review_rate"]),
            calibration_scores=arrays["calibration_scores"],
            drift={k: v for k, v in arrays.items() if k.startswith("drift.")},
            estimate=meta.get("estimate", {}), created=meta["created"], schema=int(meta["schema"]))

    @classmethod
    def fingerprint(cls, path: str | Path) -> str | None:
        """A checksum of the JSON (which names the arrays' checksum), or None when unreadable:
        cheap to poll, and it changes exactly when a new profile has been put in place."""
        jpath, _ = cls.paths(path)
        try:
            return hashlib.sha256(jpath.read_bytes()).hexdigest()
        except OSError:
            return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
