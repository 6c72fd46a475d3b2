"""Turn one scored frame into the messages it owes: score, and alert or review item.

Kept apart from the Kafka loop so the decision logic is plain functions of
(frame, score, thresholds) that read like the routing table they implement:

==========================  =======================================
score >= alert threshold    ``.scores`` + ``.alerts``
review <= score < alert     ``.scores`` + ``.review``
score < review threshold    ``.scores``
undecodable / invalid       ``.deadletter`` (original bytes + reason)
==========================  =======================================

Explanations (where the anomaly is, heatmap overlays, defect words) are
extras: :func:`route` with ``explain=False`` builds the same decision without
them, which is what the worker falls back to when explaining one frame fails.
Outputs that a cluster may refuse as too large carry a smaller ``fallback``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from inference.calibration import WARM_UP, Thresholds
from inference.scoring import ScoreResult
from inference.visualize import describe_location, encode_jpeg, overlay, regions, upsample_map
from linewatch.wire import (
    Alert,
    FrameMeta,
    FrameRef,
    Headers,
    ReviewItem,
    Score,
    Topics,
    WireError,
    dead_letter_record,
    review_item_id,
    without_payload,
)

NO_TEXT_MODEL = ("No defect vocabulary: no CLIP text model is configured, so the defect is "
                 "located but not named.")
NOT_EXPLAINED = "not explained: explaining this frame failed (see the worker log)"
VIEW_SIDE = 512          # review copies: longer side in pixels, and JPEG quality
VIEW_QUALITY = 85
SMALL_VIEW_SIDE = 256    # the fallback when a cluster refuses the first copy as too large
SMALL_VIEW_QUALITY = 60


@dataclass(frozen=True)
class Outbound:
    """One record to produce. ``fallback`` builds a smaller version of it (or None) for a
    cluster that refuses this one as too large."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers | None = None
    fallback: Callable[[], Outbound | None] | None = None


def _view(rgb: np.ndarray, result: ScoreResult, max_side: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The frame downscaled for people, its anomaly map at that size, and the scale."""
    import cv2

    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    vw, vh = max(1, round(w * scale)), max(1, round(h * scale))
    view = rgb if scale == 1.0 else cv2.resize(rgb, (vw, vh), interpolation=cv2.INTER_AREA)
    return view, upsample_map(result.anomaly_map, vw, vh, sigma=2.0), scale


def locate(rgb: np.ndarray, result: ScoreResult, th: Thresholds, max_side: int = VIEW_SIDE
           ) -> tuple[str, list[list[int]], np.ndarray, np.ndarray]:
    """Where the anomaly is: words, boxes in frame pixels, the view image and its map."""
    view, amap, scale = _view(rgb, result, max_side)
    # a warm-up sends every frame to review (threshold 0): the map's own hottest 2% then
    cut = float(np.quantile(amap, 0.98)) if th is WARM_UP else th.review
    found = regions(amap, cut)
    h, w = rgb.shape[:2]
    boxes = [[round(c / scale) for c in box] for box, _ in found]
    if not boxes:
        return "diffuse: no compact region above the review threshold", [], view, amap
    x0, y0, x1, y1 = boxes[0]
    area = int((amap[found[0][0][1]:found[0][0][3], found[0][0][0]:found[0][0][2]] >= cut).sum()
               / (scale * scale))
    return describe_location((x0, y0, x1, y1), w, h, area), boxes, view, amap


def _b64(jpeg: bytes) -> str:
    return base64.b64encode(jpeg).decode()


def route(meta: FrameMeta, ref: FrameRef, rgb: np.ndarray, result: ScoreResult, th: Thresholds,
          topics: Topics, scorer_name: str, worker: str, decided_ns: int,
          describe: Callable[[np.ndarray], str | None] | None = None, explain: bool = True,
          maybe_duplicate: bool = False) -> tuple[Score, list[Outbound]]:
    """The score message and every record this frame must produce.

    ``describe`` names what the most anomalous region looks like (CLIP defect words on
    its crop); without it, explanations say that no text model is configured.
    """
    decision = th.decide(result.score)
    score = Score(camera=meta.camera, line=meta.line, seq=meta.seq, capture_ns=meta.capture_ns,
                  decided_ns=decided_ns, score=result.score, decision=decision,
                  alert_threshold=th.alert, review_threshold=th.review, scorer=scorer_name,
                  worker=worker, ref=ref, truth=meta.truth, maybe_duplicate=maybe_duplicate,
                  mode="warm-up" if th is WARM_UP else result.mode,
                  calibrated=th.uncalibrated is None)
    out = [Outbound(topics.scores, meta.key, score.to_bytes())]
    if decision == "normal":
        return score, out
    words = None
    if explain:
        where, boxes, view, amap = locate(rgb, result, th)
        if describe is not None:
            x0, y0, x1, y1 = boxes[0] if boxes else (0, 0, rgb.shape[1], rgb.shape[0])
            words = describe(rgb[y0:y1, x0:x1])
    else:
        where, boxes, view, amap = NOT_EXPLAINED, [], _view(rgb, result, VIEW_SIDE)[0], None
    if decision == "alert":
        alert = Alert(camera=meta.camera, line=meta.line, seq=meta.seq, capture_ns=meta.capture_ns,
                      decided_ns=decided_ns, score=result.score, alert_threshold=th.alert,
                      where=where, boxes=boxes, ref=ref, words=words)
        out.append(Outbound(topics.alerts, meta.key, alert.to_bytes()))
        return score, out
    lo, hi = ((float(np.median(amap)), float(amap.max()) + 1e-6) if amap is not None and th is WARM_UP
              else (0.5 * th.review, th.alert))  # warm-up: the map's own range, no thresholds yet
    over = view if amap is None else overlay(view, amap, vmin=lo, vmax=hi)
    explanation = ((f"Uncalibrated: {th.uncalibrated}. " if th.uncalibrated else "")
                   + f"Score {result.score:.3f} is in the review band "
                   f"[{th.review:.3f}, {th.alert:.3f}). Most anomalous area: {where}. "
                   + (f"The region {words}." if words else NO_TEXT_MODEL if explain else ""))
    item = ReviewItem(
        item_id=review_item_id(meta.camera, meta.seq), camera=meta.camera, line=meta.line,
        seq=meta.seq, capture_ns=meta.capture_ns, decided_ns=decided_ns, score=result.score,
        alert_threshold=th.alert, review_threshold=th.review, where=where, explanation=explanation,
        frame_jpeg_b64=_b64(encode_jpeg(view, VIEW_SIDE, VIEW_QUALITY)),
        overlay_jpeg_b64=_b64(encode_jpeg(over, VIEW_SIDE, VIEW_QUALITY)), ref=ref)

    def smaller() -> Outbound:
        small = replace(item, frame_jpeg_b64=_b64(encode_jpeg(view, SMALL_VIEW_SIDE, SMALL_VIEW_QUALITY)),
                        overlay_jpeg_b64=_b64(encode_jpeg(over, SMALL_VIEW_SIDE, SMALL_VIEW_QUALITY)))
        return Outbound(topics.review, meta.key, small.to_bytes())

    out.append(Outbound(topics.review, meta.key, item.to_bytes(), fallback=smaller))
    return score, out


def dead_letter(topic: str, key: bytes | None, value: bytes | None, headers: Headers | None,
                err: WireError, ref: FrameRef, worker: str, max_copy_bytes: int) -> Outbound:
    """The original record, reason attached; its fallback drops the copy of the value."""
    k, v, h = dead_letter_record(key, value, headers, err, ref, worker, max_copy_bytes)
    return Outbound(topic, k, v, h, fallback=(lambda: Outbound(topic, *without_payload(k, v, h)))
                    if v else None)
