"""``linewatch calibrate``: normal images in, a line profile out, with its rates measured.

The normals are split three ways (seeded): ``--shots`` references, a calibration
set that sets the thresholds (split-conformal quantiles at the target rates),
and a test set the thresholds never saw, on which the false-alarm and review
rates are *measured* and reported next to their targets. Recall is estimated
on pseudo-anomalies made from the test normals (local augmentation, and
CutPaste as the baseline), since a new line has no real defects to count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.calibration import score_frames, thresholds_from_normals
from inference.profile import LineProfile
from inference.pseudo import generate

log = logging.getLogger(__name__)


@dataclass
class Split:
    references: list[np.ndarray]
    calibration: list[np.ndarray]
    test: list[np.ndarray]


def split_normals(images: Sequence[np.ndarray], shots: int, seed: int = 0,
                  test_fraction: float = 0.5) -> Split:
    n = len(images)
    if shots < 1 or n < shots + 4:
        raise ValueError(f"{n} normal images are too few for {shots} references plus calibration and "
                         f"test sets; give at least {shots + 4} (a few hundred for a 1% target)")
    order = np.random.default_rng(seed).permutation(n)
    rest = order[shots:]
    n_test = max(2, round(len(rest) * test_fraction))
    return Split([images[i] for i in order[:shots]], [images[i] for i in rest[n_test:]],
                 [images[i] for i in rest[:n_test]])


def calibrate_profile(scorer: Any, images: Sequence[np.ndarray],
                      shots: int, false_alarm_rate: float, review_rate: float, seed: int = 0,
                      pseudo: int = 100, batch: int = 8,
                      progress: Callable[[str, int], Any] | None = None) -> LineProfile:
    """Fit, set thresholds, measure rates and pseudo-anomaly recall; return the profile.

    The profile records ``scorer.settings`` (set by whatever built the scorer from
    :class:`~inference.settings.ScorerSettings`), so a worker rebuilds exactly this scorer."""
    from monitoring.drift import DriftReference

    split = split_normals(images, shots, seed)
    scorer.fit(split.references)

    def score(frames: Sequence[np.ndarray], what: str) -> list:
        bar = progress(what, len(frames)) if progress else None
        try:
            return score_frames(scorer, frames, batch, bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    cal = score(split.calibration, "calibration normals")
    th = thresholds_from_normals([r.score for r in cal], false_alarm_rate, review_rate)
    test = np.array([r.score for r in score(split.test, "held-out normals")])
    estimate: dict[str, Any] = {
        "seed": seed, "references": len(split.references), "calibration_normals": len(split.calibration),
        "test_normals": len(split.test),
        "false_alarm_rate_target": false_alarm_rate,
        "false_alarm_rate_observed": float(np.mean(test >= th.alert)),
        "review_rate_target": review_rate,
        "flagged_rate_observed": float(np.mean(test >= th.review)),
    }
    if pseudo:
        for method in ("local", "cutpaste"):
            fakes = generate(split.test, pseudo, method=method, seed=seed)
            s = np.array([r.score for r in score([f.image for f in fakes],
                                                 f"pseudo-anomalies ({method})")])
            estimate[f"pseudo_{method}"] = {"count": len(fakes),
                                            "recall_alert": float(np.mean(s >= th.alert)),
                                            "recall_flagged": float(np.mean(s >= th.review))}
    drift = DriftReference.from_frames(split.calibration, [r.score for r in cal],
                                       [r.embedding for r in cal])
    return LineProfile(scorer=scorer.settings, references=list(split.references), thresholds=th,
                       false_alarm_rate=false_alarm_rate, review_rate=review_rate,
                       calibration_scores=np.array([r.score for r in cal]), drift=drift.to_arrays(),
                       estimate=estimate)


def report(profile: LineProfile) -> str:
    e = profile.estimate
    rows = [("references / calibration / test normals",
             f"{e['references']} / {e['calibration_normals']} / {e['test_normals']}"),
            ("alert threshold", f"{profile.thresholds.alert:.4f}"),
            ("review threshold", f"{profile.thresholds.review:.4f}"),
            ("false-alarm rate: target / observed on test normals",
             f"{e['false_alarm_rate_target']:.3f} / {e['false_alarm_rate_observed']:.3f}"),
            ("flagged (review or alert) rate: target / observed",
             f"{e['review_rate_target']:.3f} / {e['flagged_rate_observed']:.3f}")]
    for method in ("local", "cutpaste"):
        if f"pseudo_{method}" in e:
            p = e[f"pseudo_{method}"]
            rows.append((f"pseudo-anomaly recall ({method}, n={p['count']}): alert / flagged",
                         f"{p['recall_alert']:.3f} / {p['recall_flagged']:.3f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
