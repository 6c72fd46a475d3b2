"""Anomaly-detection metrics in plain NumPy (no scikit-learn at run time).

Image level: AUROC, average precision, F1-max. Pixel level: AUROC, F1-max and
PRO (per-region overlap; Bergmann et al., MVTec AD, IJCV 2021), integrated up
to a false-positive rate of 0.3 and normalised by 0.3 so a perfect map scores 1.
Ties in the scores are handled the way scikit-learn does (one ROC point per
distinct threshold), and ``tests/test_eval_metrics.py`` checks agreement.
"""

from __future__ import annotations

import numpy as np


def _curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct threshold, highest score first."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.all() or not y.any():
        raise ValueError("metrics need both normal and anomalous samples")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), s[last]


def roc_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0)."""
    tps, fps, thr = _curve(y_true, y_score)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(y_true, y_score)
    return float(np.trapezoid(tpr, fpr))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Step-wise AP: sum over thresholds of (recall increase) x precision."""
    tps, fps, _ = _curve(y_true, y_score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Best F1 over all thresholds."""
    tps, fps, _ = _curve(y_true, y_score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def pro_auc(masks: list[np.ndarray], maps: list[np.ndarray], fpr_limit: float = 0.3,
            n_thresholds: int = 200) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    For each threshold, PRO is the mean over every connected defect region (in
    every image) of the fraction of that region above the threshold; the FPR is
    taken over all defect-free pixels. Small defects therefore weigh as much as
    large ones, unlike pixel AUROC.
    """
    import cv2

    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    region_scores: list[np.ndarray] = []
    normal_scores: list[np.ndarray] = []
    for mask, amap in zip(masks, maps, strict=True):
        m = np.asarray(mask).astype(bool)
        if m.shape != amap.shape:
            raise ValueError(f"mask {m.shape} and map {amap.shape} differ in size")
        normal_scores.append(amap[~m].ravel())
        if m.any():
            n, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
            region_scores.extend(amap[labels == r] for r in range(1, n))
    if not region_scores:
        raise ValueError("PRO needs at least one defect region")
    normal = np.sort(np.concatenate(normal_scores))
    if normal.size == 0:
        raise ValueError("PRO needs defect-free pixels")
    # thresholds spaced so that the FPR steps evenly from fpr_limit down to 0
    fprs_target = np.linspace(fpr_limit, 0.0, n_thresholds)
    thresholds = np.quantile(normal, 1.0 - fprs_target)
    fpr = 1.0 - np.searchsorted(normal, thresholds, side="right") / normal.size
    regions_sorted = [np.sort(r) for r in region_scores]
    pro = np.array([
        np.mean([1.0 - np.searchsorted(r, t, side="right") / r.size for r in regions_sorted])
        for t in thresholds
    ])
    order = np.argsort(fpr)
    fpr, pro = fpr[order], pro[order]
    keep = fpr <= fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr[-1] < fpr_limit:  # close the curve at the limit by holding the last PRO value
        fpr, pro = np.r_[fpr, fpr_limit], np.r_[pro, pro[-1]]
    return float(np.trapezoid(pro, fpr) / fpr_limit)
