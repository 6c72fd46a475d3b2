"""WinCLIP (zero-shot) and WinCLIP+ (few-shot) on an open_clip backbone.

Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023:

* **Compositional prompt ensemble**: every normal and every anomalous state
  phrase of the object is put into every template; the text embeddings of a
  class are averaged, giving one "normal" and one "anomalous" direction.
* **Zero-shot score** of an embedding: softmax over the two directions of the
  cosine similarities divided by a temperature; the anomalous probability.
* **Window maps**: every k x k window of the patch grid (k = 2 and 3 by
  default) is embedded on its own (see :mod:`inference.clip`) and scored; each
  patch receives the *harmonic mean* of the scores of all windows covering it,
  so one normal-looking window is enough to pull a patch down.
* **Multi-scale fusion**: the image-level score (as a constant map) and the
  per-scale maps are fused by their harmonic mean.
* **WinCLIP+**: a memory of the full-frame patch tokens and of every window
  embedding of k normal images; the few-shot map at each scale is the distance
  ``min over memory (1 - cos) / 2``, window scales harmonically aggregated as
  above; the scales are averaged, and the final map is the mean of the
  zero-shot and few-shot maps.

Image score and the lazy cascade: the image-level score here comes from the
*one* full-frame forward pass - the class-token zero-shot score, averaged for
WinCLIP+ with the maximum of the patch-token few-shot map. The paper's WinCLIP+
image score uses the maximum of the multi-scale few-shot map instead, which
needs every window of every frame. With ``image_score="single-pass"`` (the
default) the alert and review decisions need one pass, so window maps can be
computed only for frames whose score reaches ``map_gate`` (set it at or below
the review threshold) and the decisions are identical to computing everything.
``image_score="paper"`` reproduces the paper's score for evaluation and turns
the cascade off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from inference.clip import OpenCLIPBackbone
from inference.scoring import NotFittedError, ScoreResult

# The paper's compositional prompt ensemble (state words x templates, appendix of WinCLIP).
NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(class_name: str) -> tuple[list[str], list[str]]:
    """All normal and all anomalous prompts for ``class_name``."""
    def fill(states: Sequence[str]) -> list[str]:
        return [t.format(s.format(class_name)) for s in states for t in TEMPLATES]

    return fill(NORMAL_STATES), fill(ANOMALOUS_STATES)


def harmonic_aggregation(window_scores: torch.Tensor, index: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Per-patch harmonic mean of the scores of the windows covering it.

    ``window_scores`` (B, nW) must be positive; ``index`` (nW, k*k) lists each
    window's patches. Returns (B, n_patches): for patch p covered by windows U_p,
    ``|U_p| / sum_{u in U_p} 1 / s_u``.
    """
    n_w = index.shape[0]
    incidence = torch.zeros(n_w, n_patches, dtype=window_scores.dtype, device=window_scores.device)
    incidence[torch.arange(n_w, device=index.device).unsqueeze(1), index] = 1.0
    inv = (1.0 / window_scores.clamp_min(1e-12)) @ incidence
    return incidence.sum(dim=0) / inv


def harmonic_fusion(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of same-shaped positive maps."""
    stacked = torch.stack([m.clamp_min(1e-12) for m in maps])
    return len(maps) / (1.0 / stacked).sum(dim=0)


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``min over memory (1 - cos) / 2`` for unit-norm (..., D) queries and (M, D) memory."""
    sims = queries @ memory.T
    return (1.0 - sims.max(dim=-1).values) / 2.0


class WinCLIPScorer:
    """WinCLIP zero-shot (``few_shot=False``) or WinCLIP+ (``few_shot=True``).

    Implements the :class:`inference.scoring.Scorer` protocol. Zero-shot ignores
    reference images (``fit`` only records that it was called); WinCLIP+ keeps
    them in its memory and ``add_normals`` grows it.
    """

    def __init__(
        self,
        backbone: OpenCLIPBackbone,
        *,
        class_name: str = "object",
        few_shot: bool = False,
        scales: tuple[int, ...] = (2, 3),
        temperature: float = 0.07,
        image_score: Literal["single-pass", "paper"] = "single-pass",
        device: str | torch.device = "cpu",
    ) -> None:
        if image_score not in ("single-pass", "paper"):
            raise ValueError(f"image_score must be 'single-pass' or 'paper', got {image_score!r}")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device)
        self.few_shot = few_shot
        self.name = "winclip+" if few_shot else "winclip"
        self.scales = tuple(scales)
        self.temperature = temperature
        self.image_score = image_score
        self.class_name = class_name
        self.map_gate: float | None = None
        normal, anomalous = prompt_ensemble(class_name)
        self.text = torch.stack([backbone.text_direction(normal), backbone.text_direction(anomalous)])
        self._patch_memory: torch.Tensor | None = None
        self._window_memory: dict[int, torch.Tensor] = {}
        self._fitted = False

    @property
    def memory_size(self) -> int:
        return 0 if self._patch_memory is None else int(self._patch_memory.shape[0])

    # -- references ---------------------------------------------------------------------------
    def fit(self, normals: Sequence[np.ndarray]) -> None:
        if self.few_shot and len(normals) == 0:
            raise ValueError("winclip+ needs at least one normal reference image")
        self._patch_memory, self._window_memory = None, {}
        self._fitted = True
        self.add_normals(normals)

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        if not self.few_shot or len(normals) == 0:
            return
        x = self.backbone.preprocess(list(normals))
        f = self.backbone(x, window_sizes=self.scales)
        p = _unit(f.patch_tokens[0]).reshape(-1, f.patch_tokens[0].shape[-1])
        self._patch_memory = p if self._patch_memory is None else torch.cat([self._patch_memory, p])
        for k, w in f.windows.items():
            w = _unit(w).reshape(-1, w.shape[-1])
            old = self._window_memory.get(k)
            self._window_memory[k] = w if old is None else torch.cat([old, w])

    # -- scoring ------------------------------------------------------------------------------
    def _class_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """Anomalous-class probability for (..., E) embeddings."""
        logits = (_unit(emb) @ self.text.T) / self.temperature
        return logits.softmax(dim=-1)[..., 1]

    def score(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        if not self._fitted:
            raise NotFittedError(f"{self.name}.score() called before fit()")
        if len(images) == 0:
            return []
        if self.image_score == "paper" and self.few_shot and self.map_gate is not None:
            raise ValueError("image_score='paper' needs every window map: unset map_gate")
        x = self.backbone.preprocess(list(images))
        f = self.backbone(x)
        b = x.shape[0]
        gh, gw = self.backbone.grid
        zs = self._class_scores(f.global_embedding)  # (B,)
        patch_fs = None
        if self.few_shot:
            patch_fs = nearest_distance(_unit(f.patch_tokens[0]).reshape(b, gh * gw, -1), self._patch_memory)
            image = (zs + patch_fs.amax(dim=1)) / 2.0
        else:
            image = zs
        full = torch.ones(b, dtype=torch.bool) if self.map_gate is None else image.cpu() >= self.map_gate
        maps = (patch_fs if patch_fs is not None else zs[:, None].expand(b, gh * gw)).clone()
        rows = torch.nonzero(full).flatten().tolist()
        if rows:
            sel = torch.tensor(rows, device=f.tokens.device)
            full_maps, paper_scores = self._full_maps(
                f.tokens[sel], zs[sel], None if patch_fs is None else patch_fs[sel]
            )
            maps[sel] = full_maps
            if self.image_score == "paper" and self.few_shot:
                image = image.clone()
                image[sel] = paper_scores
        maps_np = maps.reshape(b, gh, gw).float().cpu().numpy()
        emb = _unit(f.global_embedding).float().cpu().numpy()
        return [
            ScoreResult(score=float(s), anomaly_map=m, full_map=bool(fm), embedding=e)
            for s, m, fm, e in zip(image.float().cpu().tolist(), maps_np, full.tolist(), emb,
                                   strict=True)
        ]

    def _full_maps(
        self, tokens: torch.Tensor, zs: torch.Tensor, patch_fs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Window maps for the selected frames -> (fused map (B, N), paper image score (B,))."""
        gh, gw = self.backbone.grid
        n = gh * gw
        b = tokens.shape[0]
        zs_scales = [zs[:, None].expand(b, n)]
        fs_scales = [patch_fs] if patch_fs is not None else []
        for k in self.scales:
            idx = self.backbone.window_index(k)
            w = _unit(self.backbone.encode_windows(tokens, k))
            zs_scales.append(harmonic_aggregation(self._class_scores(w), idx, n))
            if patch_fs is not None:
                fs_scales.append(harmonic_aggregation(nearest_distance(w, self._window_memory[k]), idx, n))
        zs_map = harmonic_fusion(zs_scales)
        if patch_fs is None:
            return zs_map, zs
        fs_map = torch.stack(fs_scales).mean(dim=0)
        return (zs_map + fs_map) / 2.0, (zs + fs_map.amax(dim=1)) / 2.0


def _unit(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t.float(), dim=-1)
