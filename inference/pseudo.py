"""Pseudo-anomalies: realistic fake defects, made from normal images, with exact masks.

A new line has no defect examples, yet thresholds need a recall estimate and
adaptation needs positives. Two generators:

* **local augmentation** (the method linewatch follows): cut a small patch, change
  it slightly - rotate a few degrees, shift by a few pixels, alter brightness,
  contrast and tint - and paste it back where it came from. The result looks
  like a local surface flaw rather than an obviously foreign object.
* **CutPaste** (Li et al., CVPR 2021), the usual baseline: copy a patch from one
  place and paste it unchanged somewhere else.

The mask of every sample is exactly the set of pixels that changed. A paste
that changes nothing a person could see (a shifted patch of a uniform surface, a
patch pasted onto an identical texture) is useless as a "defect", so a sample is
kept only when the SSIM between the original and the changed region stays below
``ssim_max``; otherwise another patch is tried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

METHODS = ("local", "cutpaste")


@dataclass(frozen=True)
class PseudoAnomaly:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray   # (H, W) bool: exactly the pixels that differ from the source image
    method: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the patch that was changed
    ssim: float        # SSIM of the changed box against the original (lower = more visible)


class NoVisibleChange(RuntimeError):
    """No patch of this image could be changed visibly (e.g. a uniform surface)."""


def changed_mask(original: np.ndarray, changed: np.ndarray) -> np.ndarray:
    return np.any(original != changed, axis=-1)


def region_ssim(original: np.ndarray, changed: np.ndarray, box: tuple[int, int, int, int]) -> float:
    from skimage.metrics import structural_similarity

    x0, y0, x1, y1 = box
    a = cv2.cvtColor(original[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(changed[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY)
    win = min(7, a.shape[0], a.shape[1])
    win -= 1 - win % 2  # odd
    return float(structural_similarity(a, b, win_size=max(3, win), data_range=255))


def _patch_box(h: int, w: int, rng: np.random.Generator,
               area: tuple[float, float]) -> tuple[int, int, int, int]:
    frac = rng.uniform(*area)
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    ph = int(np.clip(round(np.sqrt(frac * h * w / aspect)), 4, h - 2))
    pw = int(np.clip(round(np.sqrt(frac * h * w * aspect)), 4, w - 2))
    y0, x0 = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    return x0, y0, x0 + pw, y0 + ph


def local_augment(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.005, 0.03),
                  max_rotate_deg: float = 12.0, max_shift_frac: float = 0.12,
                  max_colour: float = 0.18) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One locally augmented copy of ``image`` and the box that was changed."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _patch_box(h, w, rng, area)
    patch = image[y0:y1, x0:x1].astype(np.float32)
    ph, pw = patch.shape[:2]
    angle = rng.uniform(-max_rotate_deg, max_rotate_deg)
    dx, dy = rng.uniform(-max_shift_frac, max_shift_frac, size=2) * (pw, ph)
    m = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, 1.0)
    m[:, 2] += (dx, dy)
    patch = cv2.warpAffine(patch, m, (pw, ph), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    gain = 1.0 + rng.uniform(-max_colour, max_colour)
    tint = rng.uniform(-max_colour, max_colour, size=3) * 40.0
    mean = patch.mean(axis=(0, 1), keepdims=True)
    patch = (patch - mean) * (1.0 + rng.uniform(-max_colour, max_colour)) + mean * gain + tint
    out = image.copy()
    out[y0:y1, x0:x1] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    return out, (x0, y0, x1, y1)


def cutpaste(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.005, 0.03)
             ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """CutPaste: a patch copied, unchanged, to another place; returns the pasted box."""
    h, w = image.shape[:2]
    sx0, sy0, sx1, sy1 = _patch_box(h, w, rng, area)
    ph, pw = sy1 - sy0, sx1 - sx0
    ty0, tx0 = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    out = image.copy()
    out[ty0:ty0 + ph, tx0:tx0 + pw] = image[sy0:sy1, sx0:sx1]
    return out, (tx0, ty0, tx0 + pw, ty0 + ph)


def make_pseudo_anomaly(image: np.ndarray, rng: np.random.Generator, method: str = "local",
                        ssim_max: float = 0.9, tries: int = 20) -> PseudoAnomaly:
    """A pseudo-anomaly whose change is visible (SSIM of the box < ``ssim_max``)."""
    if method not in METHODS:
        raise ValueError(f"unknown pseudo-anomaly method {method!r}; use one of {METHODS}")
    make = local_augment if method == "local" else cutpaste
    for _ in range(tries):
        out, box = make(image, rng)
        mask = changed_mask(image, out)
        if not mask.any():
            continue
        s = region_ssim(image, out, box)
        if s < ssim_max:
            return PseudoAnomaly(out, mask, method, box, s)
    raise NoVisibleChange(f"{tries} {method} patches all left the image looking the same "
                          f"(SSIM >= {ssim_max}); is it a uniform surface?")


def generate(images: Sequence[np.ndarray], count: int, method: str = "local", seed: int = 0,
             ssim_max: float = 0.9) -> list[PseudoAnomaly]:
    """``count`` pseudo-anomalies drawn from ``images`` in turn (deterministic for a seed)."""
    if not images:
        raise ValueError("pseudo-anomalies need at least one normal image")
    rng = np.random.default_rng(seed)
    out: list[PseudoAnomaly] = []
    failures = 0
    i = 0
    while len(out) < count:
        try:
            out.append(make_pseudo_anomaly(images[i % len(images)], rng, method, ssim_max))
        except NoVisibleChange:
            failures += 1
            if failures > 3 * len(images) + count:
                raise
        i += 1
    return out
