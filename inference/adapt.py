"""Optional adaptation: a small head on frozen patch features, trained on pseudo-anomalies.

Frozen ImageNet/DINO features describe "what is there", not "what is wrong on
this line". With no real defects, the references themselves can teach a little:
their patches are the normal class, and patches covered by pseudo-anomalies
(local augmentation, :mod:`inference.pseudo`) the anomalous one. A residual MLP
head is trained with a supervised contrastive loss (SimCLR's NT-Xent with
labels: same-class patches attract, the two classes repel) and then applied to
memory and queries alike. It starts as the identity (zero-initialised last
layer), so a head that learnt nothing changes nothing.

Whether it helps is an empirical question answered by ``linewatch evaluate
--adapt-steps N`` against 0; it is off by default.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


class ResidualHead(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.fc2(torch.relu(self.fc1(x)))
        return nn.functional.normalize(y, dim=-1)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over unit vectors ``z`` (N, D)."""
    sim = z @ z.T / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp_min(1))
    return per_anchor[pos.any(1)].mean()


@dataclass
class AdaptReport:
    steps: int
    normal_patches: int
    anomalous_patches: int
    loss_first: float
    loss_last: float


def patch_labels(mask: np.ndarray, grid: tuple[int, int], min_cover: float = 0.25) -> np.ndarray:
    """(gh, gw) bool: patches whose area is at least ``min_cover`` inside the mask."""
    gh, gw = grid
    cover = cv2.resize(mask.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    return cover >= min_cover


def train_head(scorer, normals: Sequence[np.ndarray], steps: int = 200, pseudo: int = 48,
               batch: int = 384, lr: float = 1e-3, seed: int = 0, progress: bool = False
               ) -> tuple[ResidualHead, AdaptReport]:
    """Train a head on ``scorer``'s frozen patch features of ``normals`` and their pseudo-anomalies."""
    from tqdm import tqdm

    from inference.pseudo import generate
    from inference.scoring import augmented_views, cut_tiles, tile_grid

    def pieces(image: np.ndarray) -> list[np.ndarray]:  # the tiles the scorer will see (tile_grid)
        return cut_tiles(image, *tile_grid(image.shape[0], image.shape[1], scorer.tiling))

    torch.manual_seed(seed)
    views = [t for im in normals for v in augmented_views(im, scorer.augment) for t in pieces(v)]
    fakes = generate(list(normals), pseudo, method="local", seed=seed)
    fake_images = [t for f in fakes for t in pieces(f.image)]
    fake_masks = [t for f in fakes for t in pieces(f.mask)]
    with torch.no_grad():  # clone: the backbone runs in inference mode, the head needs autograd
        f_norm = scorer.raw_patch_features(views).clone()
        f_fake = scorer.raw_patch_features(fake_images).clone()
    grid = tuple(f_fake.shape[1:3])
    bad = np.stack([patch_labels(m, grid) for m in fake_masks])  # (P, gh, gw)
    d = f_norm.shape[-1]
    normal = torch.cat([f_norm.reshape(-1, d), f_fake[torch.from_numpy(~bad)].reshape(-1, d)])
    anomalous = f_fake[torch.from_numpy(bad)].reshape(-1, d)
    if len(anomalous) < 8:
        raise ValueError(f"only {len(anomalous)} patches covered by pseudo-anomalies: raise the image "
                         "size or the number of pseudo-anomalies")
    head = ResidualHead(d).to(normal.device)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n_bad = min(len(anomalous), batch // 4)
    losses = []
    for _ in tqdm(range(steps), desc="adapting head", unit="step", disable=not progress, leave=False):
        i = torch.randint(len(normal), (batch - n_bad,), generator=gen)
        j = torch.randint(len(anomalous), (n_bad,), generator=gen)
        x = torch.cat([normal[i], anomalous[j]])
        y = torch.cat([torch.zeros(len(i)), torch.ones(len(j))]).to(x.device)
        loss = supcon_loss(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    head.eval()
    report = AdaptReport(steps, len(normal), len(anomalous), losses[0], float(np.mean(losses[-20:])))
    log.info("adaptation head: %d normal / %d pseudo-anomalous patches, loss %.3f -> %.3f",
             report.normal_patches, report.anomalous_patches, report.loss_first, report.loss_last)
    return head, report
