"""The evaluation metrics agree with scikit-learn, and PRO with hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from inference import eval_metrics as em


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.random(n) < 0.3
    y[:2] = [True, False]
    s = rng.normal(size=n) + y * rng.uniform(0, 2)
    if seed % 2:  # ties, as quantised scores produce
        s = np.round(s, 1)
    assert em.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert em.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    p, r, _ = sk.precision_recall_curve(y, s)
    f1 = np.max(2 * p * r / np.maximum(p + r, 1e-12))
    assert em.f1_max(y, s) == pytest.approx(f1, abs=1e-12)
    fpr, tpr, _ = em.roc_curve(y, s)
    fpr_sk, tpr_sk, _ = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_sk)
    np.testing.assert_allclose(tpr, tpr_sk)


def test_one_class_only_is_an_error():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        em.auroc([0, 0, 0], [0.1, 0.2, 0.3])


def _case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two images, two defect regions; normal pixels uniform in [0, 1)."""
    rng = np.random.default_rng(0)
    masks, maps = [], []
    for _ in range(2):
        masks.append(np.zeros((40, 40), bool))
        maps.append(rng.random((40, 40)))
    masks[0][5:15, 5:15] = True   # region A: 100 px
    masks[1][20:22, 20:30] = True  # region B: 20 px
    return masks, maps


def test_pro_of_a_perfect_and_of_a_half_found_map():
    masks, maps = _case()
    maps[0][masks[0]] = 2.0  # above every normal pixel: found at every threshold
    maps[1][masks[1]] = 2.0
    assert em.pro_auc(masks, maps) == pytest.approx(1.0, abs=1e-9)
    maps[1][masks[1]] = -1.0  # below every normal pixel: never found while FPR <= 0.3
    # region sizes do not matter to PRO: one of two regions found -> 0.5 (pixel recall would be 100/120)
    assert em.pro_auc(masks, maps) == pytest.approx(0.5, abs=1e-9)


def test_pro_of_a_region_split_at_the_normal_median():
    """Half of region A sits at the normal 0.85 quantile: it counts once FPR >= 0.15."""
    masks, maps = _case()
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    q = np.quantile(normal, 0.85)
    a = maps[0]
    a[5:10, 5:15] = 2.0
    a[10:15, 5:15] = q
    maps[1][masks[1]] = 2.0
    # PRO(fpr) = (1 + 0.5) / 2 = 0.75 below fpr 0.15, then (1 + 1) / 2 = 1 up to 0.3
    expected = (0.15 * 0.75 + 0.15 * 1.0) / 0.3
    assert em.pro_auc(masks, maps, n_thresholds=2000) == pytest.approx(expected, abs=2e-3)
