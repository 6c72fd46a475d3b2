"""Turn one scored frame into the messages it owes: score, and alert or review item.

Kept apart from the Kafka loop so the decision logic is plain functions of
(frame, score, thresholds) that read like the routing table they implement:

==========================  =======================================
score >= alert threshold    ``.scores`` + ``.alerts``
review <= score < alert     ``.scores`` + ``.review``
score < review threshold    ``.scores``
undecodable / invalid       ``.deadletter`` (original bytes + reason)
==========================  =======================================
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from inference.calibration import Thresholds
from inference.scoring import ScoreResult
from inference.visualize import describe_location, encode_jpeg, overlay, regions, upsample_map
from linewatch.wire import (
    H_DL_DETAIL,
    H_DL_REASON,
    H_DL_SOURCE,
    H_DL_TRUNCATED,
    H_DL_WORKER,
    Alert,
    FrameMeta,
    FrameRef,
    Headers,
    ReviewItem,
    Score,
    WireError,
    review_item_id,
)

NO_TEXT_MODEL = ("No defect vocabulary: no CLIP text model is configured, so the defect is "
                 "located but not named.")


@dataclass(frozen=True)
class Outbound:
    """One record to produce: topic, key, value, headers."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers | None = None


def _view(rgb: np.ndarray, result: ScoreResult, max_side: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The frame downscaled for people, its anomaly map at that size, and the scale."""
    import cv2

    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    vw, vh = max(1, round(w * scale)), max(1, round(h * scale))
    view = rgb if scale == 1.0 else cv2.resize(rgb, (vw, vh), interpolation=cv2.INTER_AREA)
    return view, upsample_map(result.anomaly_map, vw, vh, sigma=2.0), scale


def locate(rgb: np.ndarray, result: ScoreResult, th: Thresholds, max_side: int = 512
           ) -> tuple[str, list[list[int]], np.ndarray, np.ndarray]:
    """Where the anomaly is: words, boxes in frame pixels, the view image and its map."""
    view, amap, scale = _view(rgb, result, max_side)
    found = regions(amap, th.review)
    h, w = rgb.shape[:2]
    boxes = [[round(c / scale) for c in box] for box, _ in found]
    if not boxes:
        return "diffuse: no compact region above the review threshold", [], view, amap
    x0, y0, x1, y1 = boxes[0]
    area = int((amap[found[0][0][1]:found[0][0][3], found[0][0][0]:found[0][0][2]] >= th.review).sum()
               / (scale * scale))
    return describe_location((x0, y0, x1, y1), w, h, area), boxes, view, amap


def route(meta: FrameMeta, ref: FrameRef, rgb: np.ndarray, result: ScoreResult, th: Thresholds,
          topics: object, scorer_name: str, worker: str, decided_ns: int,
          describe: Callable[[np.ndarray], str] | None = None) -> tuple[Score, list[Outbound]]:
    """The score message and every record this frame must produce.

    ``describe`` names what the most anomalous region looks like (CLIP defect words on
    its crop); without it, explanations say that no text model is configured.
    """
    decision = th.decide(result.score)
    score = Score(camera=meta.camera, line=meta.line, seq=meta.seq, capture_ns=meta.capture_ns,
                  decided_ns=decided_ns, score=result.score, decision=decision,
                  alert_threshold=th.alert, review_threshold=th.review, scorer=scorer_name,
                  worker=worker, ref=ref, truth=meta.truth)
    out = [Outbound(topics.scores, meta.key, score.to_bytes())]  # type: ignore[attr-defined]
    if decision == "normal":
        return score, out
    where, boxes, view, amap = locate(rgb, result, th)
    words = None
    if describe is not None:
        x0, y0, x1, y1 = boxes[0] if boxes else (0, 0, rgb.shape[1], rgb.shape[0])
        words = describe(rgb[y0:y1, x0:x1])
    if decision == "alert":
        alert = Alert(camera=meta.camera, line=meta.line, seq=meta.seq, capture_ns=meta.capture_ns,
                      decided_ns=decided_ns, score=result.score, alert_threshold=th.alert,
                      where=where, boxes=boxes, ref=ref, words=words)
        out.append(Outbound(topics.alerts, meta.key, alert.to_bytes()))  # type: ignore[attr-defined]
    else:
        over = overlay(view, amap, vmin=0.5 * th.review, vmax=th.alert)
        explanation = (f"Score {result.score:.3f} is in the review band "
                       f"[{th.review:.3f}, {th.alert:.3f}). Most anomalous area: {where}. "
                       + (f"The region {words}." if words else NO_TEXT_MODEL))
        item = ReviewItem(
            item_id=review_item_id(meta.camera, meta.seq), camera=meta.camera, line=meta.line,
            seq=meta.seq, capture_ns=meta.capture_ns, decided_ns=decided_ns, score=result.score,
            alert_threshold=th.alert, review_threshold=th.review, where=where,
            explanation=explanation,
            frame_jpeg_b64=base64.b64encode(encode_jpeg(view)).decode(),
            overlay_jpeg_b64=base64.b64encode(encode_jpeg(over)).decode(), ref=ref)
        out.append(Outbound(topics.review, meta.key, item.to_bytes()))  # type: ignore[attr-defined]
    return score, out


def dead_letter(topic: str, key: bytes | None, value: bytes | None, headers: Headers | None,
                err: WireError, ref: FrameRef, worker: str, max_copy_bytes: int) -> Outbound:
    """The original record, reason attached; cut short (and marked so) only above the limit."""
    payload = value or b""
    extra: Headers = [
        (H_DL_REASON, err.reason.encode()),
        (H_DL_DETAIL, err.detail[:500].encode("utf-8", "replace")),
        (H_DL_SOURCE, f"{ref.topic}/{ref.partition}/{ref.offset}".encode()),
        (H_DL_WORKER, worker.encode()),
    ]
    if len(payload) > max_copy_bytes:
        extra.append((H_DL_TRUNCATED, str(len(payload)).encode()))
        payload = payload[:max_copy_bytes]
    return Outbound(topic, key or b"", payload, list(headers or []) + extra)
