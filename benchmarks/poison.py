"""Poison records for the chaos benchmark: bad frames of every dead-letter reason, and
malformed, unsigned, forged or oversized records on ``.labels`` and ``.review``.

Every poison frame names its camera and sequence number (only other headers are broken),
so the benchmark can account for each one as dead-lettered, not lost.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import time

import cv2
import numpy as np

from linewatch.wire import FrameMeta, FrameRef, Label, ReviewItem

POISON_CAMERA = "cam-poison"
MODEL_POISON_RGB = (255, 0, 255)  # workers run with --inject-faults poison=255:0:255


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose header declares ``width`` x ``height`` pixels."""
    data = bytearray(_jpeg(np.full((16, 16, 3), 90, np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bad_frames(first_seq: int, count: int, max_frame_bytes: int, max_pixels: int,
               size: int = 128) -> tuple[list[tuple[bytes, list]], dict[int, str]]:
    """``count`` frame records cycling through every dead-letter reason (the model-poison
    frame for scoring_failed); also seq -> the reason each must be dead-lettered with."""
    rng = np.random.default_rng(first_seq)
    good_rgb = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    good = _jpeg(good_rgb)
    png = cv2.imencode(".png", good_rgb)[1].tobytes()
    side = int(max_pixels ** 0.5) + 8
    records, expect = [], {}
    kinds = ["truncated_image", "empty_payload", "not_an_image", "missing_header", "bad_header",
             "unknown_schema", "too_large", "too_many_pixels", "encoding_mismatch", "size_mismatch",
             "scoring_failed"]
    for i in range(count):
        seq, kind = first_seq + i, kinds[i % len(kinds)]
        meta = FrameMeta(camera=POISON_CAMERA, line="chaos", seq=seq, capture_ns=time.time_ns(),
                         encoding="jpeg", width=size, height=size)
        h = dict(meta.headers())
        value = good
        if kind == "truncated_image":
            value = good[: len(good) // 2]
        elif kind == "empty_payload":
            value = b""
        elif kind == "not_an_image":
            value = b"this is not a picture"
        elif kind == "missing_header":
            del h["lw-width"]
        elif kind == "bad_header":
            h["lw-height"] = b"tall"
        elif kind == "unknown_schema":
            h["lw-schema"] = b"99"
        elif kind == "too_large":
            value = b"\xff\xd8" + rng.bytes(max_frame_bytes + 10)
        elif kind == "too_many_pixels":
            value = jpeg_declaring(side, side)
            h["lw-width"] = h["lw-height"] = str(side).encode()
        elif kind == "encoding_mismatch":
            value = png
        elif kind == "size_mismatch":
            h["lw-width"] = str(size * 2).encode()
        elif kind == "scoring_failed":
            marked = good_rgb.copy()
            marked[:16, :16] = MODEL_POISON_RGB
            value = _jpeg(marked)
        records.append((value, list(h.items())))
        expect[seq] = kind
    return records, expect


def _signed_json(d: dict, key: bytes) -> bytes:
    d = {k: v for k, v in d.items() if k != "sig"}
    d["sig"] = hmac.new(key, json.dumps(d, separators=(",", ":"), sort_keys=True).encode(),
                        hashlib.sha256).hexdigest()
    return json.dumps(d).encode()


def bad_labels(count: int, key: bytes) -> list[bytes]:
    """Malformed (validly signed), unsigned, forged and oversized-image labels."""
    base = Label(item_id=f"{POISON_CAMERA}:1", camera=POISON_CAMERA, line="chaos", seq=1,
                 verdict="normal", operator="mallory",
                 frame_jpeg_b64=base64.b64encode(_jpeg(np.full((32, 32, 3), 99, np.uint8))).decode())
    good = json.loads(base.to_bytes())
    variants = [
        _signed_json({**good, "seq": None}, key), _signed_json({**good, "camera": 7}, key),
        _signed_json({**good, "frame_jpeg_b64": 12345}, key),
        _signed_json({**good, "item_id": ["x", 1]}, key), _signed_json({**good, "seq": 2**70}, key),
        _signed_json({k: v for k, v in good.items() if k != "verdict"}, key),
        b"\x00\x01 not json", base.to_bytes(),  # unsigned: a forged verdict
        _signed_json(good, b"another-key-of-32-bytes-0123456789"),  # forged signature
        _signed_json({**good, "frame_jpeg_b64": base64.b64encode(jpeg_declaring(20000, 20000)).decode()},
                     key),
    ]
    return [variants[i % len(variants)] for i in range(count)]


def bad_review_items(count: int) -> list[bytes]:
    good = json.loads(ReviewItem(
        item_id=f"{POISON_CAMERA}:2", camera=POISON_CAMERA, line="chaos", seq=2, capture_ns=1,
        decided_ns=2, score=0.3, alert_threshold=0.4, review_threshold=0.2, where="centre",
        explanation="-", frame_jpeg_b64=base64.b64encode(_jpeg(np.zeros((8, 8, 3), np.uint8))).decode(),
        overlay_jpeg_b64=base64.b64encode(_jpeg(np.zeros((8, 8, 3), np.uint8))).decode(),
        ref=FrameRef("x", 0, 0)).to_bytes())
    variants = [
        {**good, "score": None}, {**good, "seq": "12"}, {**good, "seq": 2**70},
        {k: v for k, v in good.items() if k != "camera"}, {**good, "item_id": "other:3"},
        {**good, "schema": 5}, {**good, "ref": "nowhere"},
        {**good, "overlay_jpeg_b64": base64.b64encode(jpeg_declaring(30000, 30000)).decode()},
        {**good, "frame_jpeg_b64": "!!not base64!!"}, None,
    ]
    return [b"\xff garbage" if v is None else json.dumps(v).encode()
            for v in (variants[i % len(variants)] for i in range(count))]
