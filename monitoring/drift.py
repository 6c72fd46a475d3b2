"""Streaming drift per camera: is the line still the line the thresholds were set on?

Thresholds are calibrated once, on normal frames. Real lines then change for
reasons that are not defects - a lamp dims, the lens gets dirty, the camera is
knocked, a new batch of material arrives - and a monitor that keeps scoring
without saying so slowly becomes wrong. Each camera keeps a sliding window of
its last frames and compares it with the **reference**: the held-out normal
frames the worker calibrated on (their scores, image statistics and
embeddings). Three families of statistics:

* **score distribution**: population stability index (PSI) over quantile bins
  of the reference scores, and the two-sample Kolmogorov-Smirnov statistic;
* **image quality**: relative change of mean brightness, contrast (luma
  standard deviation) and sharpness (variance of the Laplacian over the luma
  variance: it falls when the lens blurs, not when the lamp dims), and the
  colour-cast shift (distance of the mean CIELab a*/b* chroma from the
  reference's, in Lab units);
* **embedding**: cosine distance of the window's mean embedding from the
  reference's mean embedding (the scene changed in the model's own terms).

Each statistic has a threshold. Image-quality thresholds are fixed fractions a
person can read ("15% darker"); the score and embedding thresholds depend on
how many frames each side has, so they are derived from the sample sizes (KS
critical value, PSI's sampling noise, a bootstrap of the reference
embeddings) and can be overridden. Statistics and thresholds are exported
side by side so an alert rule is just ``linewatch_drift > linewatch_drift_threshold``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

QUALITY_FEATURES = ("brightness", "contrast", "sharpness", "chroma_a", "chroma_b")
"""Per-frame image statistics, in this order: mean luma, luma std, Laplacian/luma variance,
mean CIELab a*, mean CIELab b* (0 = neutral grey)."""

STATISTICS = ("score_psi", "score_ks", "brightness", "contrast", "sharpness", "colour_cast",
              "embedding")
RELATIVE = ("brightness", "contrast", "sharpness")  # signed relative change; thresholds on |x|

DEFAULT_THRESHOLDS: dict[str, float | None] = {
    "score_psi": None,      # auto: what sampling noise exceeds with probability 0.001 (>= 0.25)
    "score_ks": None,       # auto: two-sample KS critical value at alpha = 0.001
    "brightness": 0.15,     # 15% brighter or darker
    "contrast": 0.25,
    "sharpness": 0.5,       # blur halves the Laplacian variance long before a person notices
    "colour_cast": 6.0,     # CIELab a*b* units (about a just-noticeable tint on a grey part)
    "embedding": None,      # auto: bootstrap of the reference embeddings, see embedding_threshold
}

_QUALITY_SIDE = 384  # image statistics on a fixed-size copy, so sharpness does not depend on resolution
KS_ALPHA = 0.001


class DriftConfigError(ValueError):
    """A drift threshold or window setting is invalid; the message names it."""


def image_quality(rgb: np.ndarray) -> np.ndarray:
    """The five :data:`QUALITY_FEATURES` of one RGB uint8 frame (float64). Runs on every
    frame, so the reductions are OpenCV's (a quarter of the time numpy's float64 copies took)."""
    h, w = rgb.shape[:2]
    scale = _QUALITY_SIDE / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    lab = cv2.mean(cv2.cvtColor(small, cv2.COLOR_RGB2LAB))
    mean, std = (float(v.item()) for v in cv2.meanStdDev(gray))
    lap_std = float(cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_64F))[1].item())
    # Laplacian variance over luma variance: edges relative to contrast, so a dimmer lamp
    # (which scales both) does not read as blur, while defocus (which removes edges) does
    luma_var = std * std
    sharpness = lap_std * lap_std / luma_var if luma_var > 1e-6 else 0.0
    return np.array([mean, std, sharpness, lab[1] - 128.0, lab[2] - 128.0], dtype=np.float64)


def psi_bins(n_reference: int) -> int:
    """Quantile bins for PSI: about ten reference scores per bin, between 2 and 10 bins."""
    return int(min(10, max(2, n_reference // 10)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int | None = None,
        pseudo_count: float = 0.5) -> float:
    """Population stability index of ``current`` against ``reference``.

    Bins are the reference's quantiles (each holds about 1/bins of the reference),
    with open outer bins so scores beyond the reference range still count. Each
    bin's count gets ``pseudo_count`` before normalising: a short window easily
    leaves one bin empty, and a tiny floor instead would make that one empty bin
    look like a huge shift. 0 means identical; the usual reading is < 0.1 stable,
    0.1-0.25 moderate, > 0.25 a real shift (for large samples; see psi_threshold).
    """
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    b = bins or psi_bins(len(reference))
    inner = np.quantile(reference, np.linspace(0, 1, b + 1)[1:-1])

    def shares(x: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(inner, x, side="right"), minlength=b) + pseudo_count
        return counts / counts.sum()

    p, q = shares(reference), shares(current)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_threshold(n_reference: int, n_current: int, bins: int | None = None,
                  alpha: float = KS_ALPHA) -> float:
    """The PSI that two samples of one distribution exceed with probability ``alpha``; >= 0.25.

    Under no change, PSI x nm/(n+m) is approximately chi-squared with bins-1
    degrees of freedom. With 40 reference scores and a 100-frame window, PSI is
    ~0.1 from sampling alone and passes 0.36 one window in a hundred, so the
    textbook fixed 0.25 would page on noise when the reference is small.
    """
    from scipy.stats import chi2

    b = bins or psi_bins(n_reference)
    return max(0.25, float(chi2.ppf(1.0 - alpha, b - 1)) * (1.0 / n_reference + 1.0 / n_current))


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two CDFs."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def ks_threshold(n_reference: int, n_current: int, alpha: float = KS_ALPHA) -> float:
    """The asymptotic two-sample KS critical value c(alpha) * sqrt((n + m) / (n m))."""
    c = math.sqrt(-0.5 * math.log(alpha / 2.0))
    return c * math.sqrt((n_reference + n_current) / (n_reference * n_current))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(1.0 - np.dot(a, b) / (na * nb))


@dataclass
class DriftReference:
    """What "normal" looked like at calibration: one row per held-out normal frame."""

    scores: np.ndarray                  # (n,)
    quality: np.ndarray                 # (n, 5), columns QUALITY_FEATURES
    embeddings: np.ndarray | None = None  # (n, d) or None when the scorer has no embedding

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.quality = np.asarray(self.quality, dtype=np.float64).reshape(-1, len(QUALITY_FEATURES))
        n = len(self.scores)
        if n < 2:
            raise DriftConfigError(f"a drift reference needs at least 2 normal frames, got {n}")
        if len(self.quality) != n or (self.embeddings is not None and len(self.embeddings) != n):
            raise DriftConfigError("drift reference: scores, quality and embeddings differ in length")
        self._emb_mean = None if self.embeddings is None else self.embeddings.mean(axis=0)
        self._emb_boot: dict[int, float] = {}

    @classmethod
    def from_frames(cls, images: Sequence[np.ndarray], scores: Sequence[float],
                    embeddings: Sequence[np.ndarray | None]) -> DriftReference:
        emb = None
        if embeddings and all(e is not None for e in embeddings):
            emb = np.stack([np.asarray(e, dtype=np.float64) for e in embeddings])
        return cls(np.asarray(scores), np.stack([image_quality(im) for im in images]), emb)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for a safetensors profile); :meth:`from_arrays` inverts it."""
        out = {"drift.scores": self.scores, "drift.quality": self.quality}
        if self.embeddings is not None:
            out["drift.embeddings"] = np.asarray(self.embeddings, dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> DriftReference:
        return cls(arrays["drift.scores"], arrays["drift.quality"], arrays.get("drift.embeddings"))

    @property
    def embedding_mean(self) -> np.ndarray | None:
        return self._emb_mean

    @property
    def n(self) -> int:
        return len(self.scores)

    def embedding_threshold(self, window: int, factor: float = 3.0, resamples: int = 200) -> float:
        """Embedding-drift threshold for a window of ``window`` frames.

        Resample ``window`` reference embeddings (with replacement) many times and
        measure how far each resample's mean lands from the reference mean: that is
        how far a window of normal frames wanders by chance. A fresh window is
        further still, because the reference mean is itself a sample (the squared
        distance grows by 1 + window/n), and ``factor`` leaves a margin.
        """
        if self.embeddings is None:
            raise DriftConfigError("this reference has no embeddings")
        if window not in self._emb_boot:
            rng = np.random.default_rng(0)
            idx = rng.integers(0, self.n, size=(resamples, window))
            d = [cosine_distance(self.embeddings[i].mean(axis=0), self._emb_mean) for i in idx]
            self._emb_boot[window] = float(np.quantile(d, 0.99))
        return max(1e-6, factor * self._emb_boot[window] * (1.0 + window / self.n))


def window_statistics(ref: DriftReference, scores: np.ndarray, quality: np.ndarray,
                      embeddings: np.ndarray | None) -> dict[str, float]:
    """Every statistic of :data:`STATISTICS` for one window (embedding only when both sides have one)."""
    rq, wq = ref.quality.mean(axis=0), quality.mean(axis=0)
    out = {
        "score_psi": psi(ref.scores, scores),
        "score_ks": ks_statistic(ref.scores, scores),
        "colour_cast": float(math.hypot(wq[3] - rq[3], wq[4] - rq[4])),
    }
    for i, name in enumerate(RELATIVE):
        out[name] = float(wq[i] / rq[i] - 1.0) if rq[i] > 0 else 0.0
    if embeddings is not None and ref.embeddings is not None and len(embeddings):
        out["embedding"] = cosine_distance(embeddings.mean(axis=0), ref.embedding_mean)
    return out


def parse_thresholds(items: Sequence[str]) -> dict[str, float]:
    """``["brightness=0.2", "score_ks=0.3"]`` -> overrides, with a clear error on a bad item."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in STATISTICS:
            raise DriftConfigError(f"drift threshold {item!r}: write STATISTIC=VALUE with STATISTIC "
                                   f"one of {', '.join(STATISTICS)}")
        try:
            v = float(value)
        except ValueError:
            raise DriftConfigError(f"drift threshold {item!r}: {value!r} is not a number") from None
        if not v > 0:
            raise DriftConfigError(f"drift threshold {item!r}: must be > 0")
        out[name] = v
    return out


@dataclass(frozen=True)
class CameraDrift:
    """One camera's window, summarised: what :func:`monitoring.metrics.publish_drift` exports."""

    statistics: dict[str, float]
    thresholds: dict[str, float]
    quality: np.ndarray  # window means of QUALITY_FEATURES
    frames: int

    def drifting(self) -> list[str]:
        """Statistics over their threshold (relative ones by magnitude)."""
        return [k for k, v in self.statistics.items() if abs(v) > self.thresholds[k]]


@dataclass
class _Camera:
    scores: deque
    quality: deque
    embeddings: deque


class DriftMonitor:
    """Sliding windows per (line, camera) against one :class:`DriftReference`.

    ``observe`` is called for every scored frame, ``snapshot`` for the current
    statistics and thresholds of every camera whose window holds at least
    ``min_frames`` frames (fewer would make the statistics noise). Thread-safe.
    """

    def __init__(self, reference: DriftReference, window: int = 100, min_frames: int | None = None,
                 thresholds: Mapping[str, float] | None = None) -> None:
        if window < 5:
            raise DriftConfigError(f"drift window must be at least 5 frames, got {window}")
        self.reference = reference
        self.window = window
        self.min_frames = min(window, min_frames if min_frames is not None else max(5, window // 2))
        self.overrides = dict(thresholds or {})
        unknown = set(self.overrides) - set(STATISTICS)
        if unknown:
            raise DriftConfigError(f"unknown drift statistics {sorted(unknown)}; known: {STATISTICS}")
        self._cams: dict[tuple[str, str], _Camera] = {}
        self._thresholds: dict[int, dict[str, float]] = {}
        self._lock = threading.Lock()
        self.thresholds(window)  # now, at start-up: scipy's import (0.7 s) was the first batch's

    def rebase_scores(self, scores: Sequence[float]) -> None:
        """New calibration scores (the reference memory grew): score drift is measured anew."""
        with self._lock:
            self.reference = DriftReference(np.asarray(scores), self.reference.quality,
                                            self.reference.embeddings)
            self._thresholds.clear()
            for cam in self._cams.values():
                cam.scores.clear()  # old scores came from the old memory

    def observe(self, line: str, camera: str, score: float, rgb: np.ndarray | None = None,
                embedding: np.ndarray | None = None, quality: np.ndarray | None = None) -> None:
        q = quality if quality is not None else image_quality(rgb)  # type: ignore[arg-type]
        with self._lock:
            cam = self._cams.get((line, camera))
            if cam is None:
                cam = _Camera(deque(maxlen=self.window), deque(maxlen=self.window),
                              deque(maxlen=self.window))
                self._cams[(line, camera)] = cam
            cam.scores.append(float(score))
            cam.quality.append(np.asarray(q, dtype=np.float64))
            if embedding is not None:
                cam.embeddings.append(np.asarray(embedding, dtype=np.float64))

    def thresholds(self, n_window: int) -> dict[str, float]:
        """The threshold of every statistic for a window of ``n_window`` frames (cached: they
        depend only on the two sample sizes, and are asked for after every batch)."""
        cached = self._thresholds.get(n_window)
        if cached is None:
            cached = self._thresholds[n_window] = self._compute_thresholds(n_window)
        return cached

    def _compute_thresholds(self, n_window: int) -> dict[str, float]:
        n = self.reference.n
        out = {name: float(v) for name, v in DEFAULT_THRESHOLDS.items() if v is not None}
        out["score_psi"] = psi_threshold(n, n_window)
        out["score_ks"] = ks_threshold(n, n_window)
        if self.reference.embeddings is not None:
            out["embedding"] = self.reference.embedding_threshold(n_window)
        out.update(self.overrides)
        return out

    def snapshot(self) -> dict[tuple[str, str], CameraDrift]:
        """(line, camera) -> its :class:`CameraDrift`, for cameras with ``min_frames`` or more."""
        with self._lock:
            cams = {k: (np.array(c.scores), np.array(c.quality),
                        np.array(c.embeddings) if len(c.embeddings) == len(c.scores) else None)
                    for k, c in self._cams.items() if len(c.scores) >= self.min_frames}
        out = {}
        for key, (s, q, e) in cams.items():
            out[key] = CameraDrift(window_statistics(self.reference, s, q, e),
                                   self.thresholds(len(s)), q.mean(axis=0), len(s))
        return out

    def forget(self, keys: list[tuple[str, str]]) -> None:
        """Drop these cameras' windows (they went quiet; see monitoring.metrics.CameraSeries)."""
        with self._lock:
            for k in keys:
                self._cams.pop(k, None)
