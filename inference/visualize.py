"""Pictures and words for a person: heatmap overlays, boxes, where the defect is.

Pure image functions with no knowledge of Kafka; the worker uses them for
alerts and review items, the evaluation for its overlay grids.
"""

from __future__ import annotations

import cv2
import numpy as np


def upsample_map(anomaly_map: np.ndarray, width: int, height: int, sigma: float = 4.0) -> np.ndarray:
    """Model-grid anomaly map -> (height, width) float32, bilinear then Gaussian-smoothed."""
    m = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), sigma)
    return m


def overlay(rgb: np.ndarray, amap_full: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.45) -> np.ndarray:
    """Blend a JET heatmap of ``amap_full`` (same size as ``rgb``) over the image.

    Values are scaled to [vmin, vmax] so colours mean the same thing on every
    frame of a line (red = at or above the alert threshold), instead of being
    normalised per frame, which would paint every normal frame red somewhere.
    """
    span = max(vmax - vmin, 1e-9)
    norm = np.clip((amap_full - vmin) / span, 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    weight = (alpha * norm)[..., None]  # cold areas stay readable
    return np.clip(rgb * (1 - weight) + heat * weight, 0, 255).astype(np.uint8)


def regions(amap_full: np.ndarray, threshold: float, max_regions: int = 3,
            min_area_fraction: float = 0.0005) -> list[tuple[tuple[int, int, int, int], float]]:
    """Connected areas above ``threshold`` as ((x0, y0, x1, y1), peak), strongest first."""
    mask = (amap_full >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = min_area_fraction * amap_full.size
    found = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area < min_area:
            continue
        peak = float(amap_full[labels == i].max())
        found.append(((int(x), int(y), int(x + w), int(y + h)), peak))
    found.sort(key=lambda r: -r[1])
    return found[:max_regions]


def describe_location(box: tuple[int, int, int, int], width: int, height: int,
                      area_px: int | None = None) -> str:
    """Where a box is, in the words an operator uses: "upper left, 2% of the frame"."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    vert = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    place = "centre" if (vert, horiz) == ("middle", "centre") else f"{vert} {horiz}"
    area = area_px if area_px is not None else (x1 - x0) * (y1 - y0)
    pct = 100.0 * area / float(width * height)
    size = f"{pct:.1f}%" if pct < 10 else f"{pct:.0f}%"
    return f"{place}, {size} of the frame"


def encode_jpeg(rgb: np.ndarray, max_side: int = 512, quality: int = 85) -> bytes:
    """Downscale so the longer side is at most ``max_side`` and encode as JPEG."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
