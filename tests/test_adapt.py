"""The optional adaptation head: identity at start, the contrastive loss by hand, training
that actually lowers it on real DINOv2 features. Whether it *helps* is measured with
`linewatch evaluate --adapt-steps` (README: it did not, so it is off by default)."""

from __future__ import annotations

import math

import numpy as np
import torch

from inference.adapt import ResidualHead, patch_labels, supcon_loss


def test_head_starts_as_the_identity() -> None:
    x = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    torch.testing.assert_close(ResidualHead(16)(x), x)


def test_supcon_loss_by_hand() -> None:
    # two unit vectors per class, classes orthogonal: anchor 0's positive is 1 (cos 1), negatives 2, 3 (cos 0)
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0.0)))
    assert math.isclose(float(supcon_loss(z, y, temperature=t)), expected, rel_tol=1e-6)


def test_patch_labels_need_a_quarter_of_the_cell() -> None:
    mask = np.zeros((80, 80), bool)
    mask[0:10, 0:10] = True    # covers 100 % of cell (0, 0) on an 8x8 grid
    mask[40:43, 40:50] = True  # covers 30 % of cell (4, 4)
    mask[70:72, 70:72] = True  # covers 4 % of cell (7, 7)
    lab = patch_labels(mask, (8, 8))
    assert lab[0, 0] and lab[4, 4] and not lab[7, 7] and lab.sum() == 2


def test_training_lowers_the_loss_on_real_features() -> None:
    from inference import create_scorer
    from producers.sources import SyntheticConveyor

    torch.set_num_threads(2)
    scorer = create_scorer("patch-knn", image_size=112, adapt_steps=60)
    scorer.fit(SyntheticConveyor(seed=1, size=(224, 224)).normals(2))
    rep = scorer.adapt_report
    assert rep.anomalous_patches >= 8 and rep.normal_patches > rep.anomalous_patches
    assert rep.loss_last < rep.loss_first
    assert scorer.head is not None and scorer.memory_size > 0
