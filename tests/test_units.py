"""Unit tests of the pure parts: wire contract, decoding, calibration, sources, visuals."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from consumers.decode import decode_frame
from inference.calibration import conformal_quantile, thresholds_from_normals
from inference.visualize import describe_location, overlay, regions
from linewatch.images import list_images
from linewatch.wire import (
    FRAME_SCHEMA,
    FrameMeta,
    FrameRef,
    Label,
    ReviewItem,
    Score,
    Topics,
    WireError,
)
from producers.producer import encode_frame
from producers.sources import SyntheticConveyor


def meta(**kw) -> FrameMeta:
    base = dict(camera="c1", line="L1", seq=7, capture_ns=123, encoding="jpeg", width=32, height=24)
    return FrameMeta(**(base | kw))


def test_frame_headers_round_trip():
    m = meta(truth="defect")
    assert FrameMeta.from_headers(m.headers()) == m
    assert m.key == b"c1"
    assert dict(m.headers())["lw-schema"] == str(FRAME_SCHEMA).encode()


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda h: [x for x in h if x[0] != "lw-schema"], "missing_header"),
    (lambda h: [x for x in h if x[0] != "lw-seq"], "missing_header"),
    (lambda h: [(k, b"2" if k == "lw-schema" else v) for k, v in h], "unknown_schema"),
    (lambda h: [(k, b"x" if k == "lw-schema" else v) for k, v in h], "bad_header"),
    (lambda h: [(k, b"-1" if k == "lw-seq" else v) for k, v in h], "bad_header"),
    (lambda h: [(k, b"gif" if k == "lw-encoding" else v) for k, v in h], "bad_header"),
    (lambda h: [(k, b"\xff\xfe" if k == "lw-line" else v) for k, v in h], "bad_header"),
    (lambda h: [*h, ("lw-truth", b"maybe")], "bad_header"),
])
def test_frame_header_errors_name_the_reason(mutate, reason):
    with pytest.raises(WireError) as e:
        FrameMeta.from_headers(mutate(meta().headers()))
    assert e.value.reason == reason


def test_result_messages_round_trip():
    ref = FrameRef("p.frames", 2, 99)
    s = Score(camera="c", line="l", seq=1, capture_ns=1, decided_ns=2, score=0.5, decision="review",
              alert_threshold=0.7, review_threshold=0.4, scorer="patch-knn", worker="w", ref=ref)
    assert Score.from_bytes(s.to_bytes()) == s
    lab = Label(item_id="c:1", camera="c", line="l", seq=1, verdict="normal", operator="ann")
    assert Label.from_bytes(lab.to_bytes()) == lab
    with pytest.raises(WireError):
        Label(item_id="c:1", camera="c", line="l", seq=1, verdict="maybe", operator="ann")
    with pytest.raises(WireError):
        ReviewItem.from_bytes(s.to_bytes())  # a score is not a review item
    with pytest.raises(WireError):
        Score.from_bytes(b"\x00not json")
    assert Topics("x").all() == ["x.frames", "x.scores", "x.alerts", "x.review", "x.labels", "x.deadletter"]


def _jpeg(w=32, h=24) -> bytes:
    return encode_frame(np.full((h, w, 3), 128, np.uint8), "jpeg", 90)


def test_decode_accepts_good_frame_and_matches_pixels():
    im = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    m, rgb = decode_frame(meta(encoding="png").headers(), encode_frame(im, "png"))
    assert m.seq == 7 and np.array_equal(rgb, im)


@pytest.mark.parametrize(("value", "hdr", "kw", "reason"), [
    (b"", {}, {}, "empty_payload"),
    (b"GIF89a....", {}, {}, "not_an_image"),
    (None, {}, {}, "empty_payload"),
    ("truncated", {}, {}, "truncated_image"),
    ("jpeg", {"encoding": "png"}, {}, "encoding_mismatch"),
    ("jpeg", {"width": 33}, {}, "size_mismatch"),
    ("jpeg", {}, {"max_bytes": 100}, "too_large"),
    ("jpeg", {}, {"max_pixels": 700}, "too_many_pixels"),
])
def test_decode_rejections(value, hdr, kw, reason):
    if value == "jpeg":
        value = _jpeg()
    elif value == "truncated":
        value = encode_frame(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8))
        value = value[: len(value) // 2]
        hdr = {"width": 320, "height": 240}
    with pytest.raises(WireError) as e:
        decode_frame(meta(**hdr).headers(), value, **kw)
    assert e.value.reason == reason


def test_decode_refuses_decompression_bomb_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, "PNG")  # 400 MP that compresses to ~0.4 MB
    with pytest.raises(WireError) as e:
        decode_frame(meta(encoding="png", width=20000, height=20000).headers(), buf.getvalue())
    assert e.value.reason == "too_many_pixels"


def test_conformal_quantile_hand_computed():
    scores = list(range(1, 20))  # 19 normals: ceil(20 * 0.9) = 18 -> 18th smallest = 18
    t, ok = conformal_quantile(scores, 0.1)
    assert ok and t == np.nextafter(18.0, np.inf)
    t, ok = conformal_quantile(scores, 0.01)  # needs 99 normals
    assert not ok and t > 19
    th = thresholds_from_normals(scores, 0.05, 0.2)  # ceil(20*.95)=19 -> 19; ceil(20*.8)=16 -> 16
    assert math.isclose(th.alert, 19, rel_tol=1e-12) and math.isclose(th.review, 16, rel_tol=1e-12)
    assert th.decide(19.5) == "alert" and th.decide(17) == "review" and th.decide(3) == "normal"
    with pytest.raises(ValueError):
        thresholds_from_normals(scores, 0.2, 0.1)


def test_conformal_false_alarm_rate_holds_on_fresh_normals():
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):
        cal = rng.gamma(2.0, 1.0, 199)
        th, _ = conformal_quantile(cal, 0.05)
        rates.append(np.mean(rng.gamma(2.0, 1.0, 2000) >= th))
    assert np.mean(rates) <= 0.05 + 0.005


def test_synthetic_conveyor_is_deterministic_and_masks_match_changes():
    a, b = SyntheticConveyor(seed=5, defect_rate=1.0), SyntheticConveyor(seed=5, defect_rate=1.0)
    for i in range(6):
        fa, fb = a.frame(i), b.frame(i)
        assert np.array_equal(fa.image, fb.image)
        clean = a.frame(i, allow_defect=False).image
        diff = np.abs(fa.image.astype(int) - clean).max(axis=2)
        changed = diff > 0
        if fa.truth == "defect":
            assert fa.mask is not None and fa.mask.any()
            # the defect visibly changed pixels on its mask; outside it (beyond a 2 px rim)
            # burns and stains leave only a faint halo of at most 8 grey levels
            near = cv2.dilate(fa.mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert (diff[fa.mask] > 8).any()
            assert diff[~near].max() <= 8
        else:
            assert not changed.any()
    assert all(SyntheticConveyor(seed=1, defect_rate=0.0).frame(i).truth == "normal" for i in range(5))


def test_list_images_understands_dataset_layouts(tmp_path):
    for rel in ["train/good/0.png", "test/good/1.png", "test/crack/2.png",
                "ground_truth/crack/2_mask.png", "MT_Free/Imgs/a.jpg", "MT_Free/Imgs/a.png",
                "MT_Break/Imgs/b.jpg", "MT_Break/Imgs/b.png", "plain/x.jpg", "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    got = {str(p.relative_to(tmp_path)): t for p, t in list_images(tmp_path)}
    assert got == {"train/good/0.png": "normal", "test/good/1.png": "normal",
                   "test/crack/2.png": "defect", "MT_Free/Imgs/a.jpg": "normal",
                   "MT_Break/Imgs/b.jpg": "defect", "plain/x.jpg": None}


def test_regions_overlay_and_location_words():
    amap = np.zeros((100, 200), np.float32)
    amap[10:20, 10:30] = 1.0  # upper left blob
    amap[80:90, 150:190] = 0.8
    found = regions(amap, 0.5)
    assert [b for b, _ in found] == [(10, 10, 30, 20), (150, 80, 190, 90)]
    assert describe_location(found[0][0], 200, 100) == "upper left, 1.0% of the frame"
    assert describe_location((90, 40, 110, 60), 200, 100).startswith("centre")
    rgb = np.full((100, 200, 3), 100, np.uint8)
    out = overlay(rgb, amap, 0.0, 1.0)
    assert np.array_equal(out[50, 100], rgb[50, 100])  # cold stays untouched
    assert out[15, 15, 2] != 100  # hot is tinted


def test_label_learner_counts_a_redelivered_label_once_and_forgets_the_oldest(monkeypatch):
    """Dedup of at-least-once label delivery, with a bounded memory of applied label ids."""
    from prometheus_client import REGISTRY

    import consumers.labels as labels
    from linewatch.wire import Label

    monkeypatch.setattr(labels, "MAX_SEEN_LABELS", 3)
    # defect verdicts never touch the scorer, so none is needed for what this checks
    learner = labels.ReferenceLearner(None, [], None, "w-seen")

    def lab(i: int) -> labels.Verdict:
        return labels.Verdict(Label(item_id=f"cam:{i}", camera="cam", line="l", seq=i,
                                    verdict="defect", operator="op"))

    def applied() -> float:
        return REGISTRY.get_sample_value("linewatch_labels_applied_total",
                                         {"worker": "w-seen", "verdict": "defect"})

    learner.apply([lab(0), lab(0), lab(1)])
    assert applied() == 2
    learner.apply([lab(1)])  # redelivered
    assert applied() == 2
    learner.apply([lab(2), lab(3)])
    assert list(learner.seen) == ["cam:1", "cam:2", "cam:3"]  # cam:0 forgotten, memory stays at 3
    learner.apply([lab(0)])
    assert applied() == 5


# --- the wire contract's one parsing path ---------------------------------------------------------
def _score_dict() -> dict:
    import json

    s = Score(camera="Line 1", line="L", seq=2**62, capture_ns=1, decided_ns=2, score=0.5,
              decision="review", alert_threshold=0.7, review_threshold=0.4, scorer="patch-knn",
              worker="w", ref=FrameRef("p.frames", 2, 99))
    return json.loads(s.to_bytes())


@pytest.mark.parametrize("change", [
    {"seq": None}, {"seq": "12"}, {"seq": 2**63}, {"seq": -1}, {"seq": True}, {"seq": 1.5},
    {"score": "high"}, {"score": None}, {"ref": [1, 2]}, {"ref": {"topic": "t", "partition": "0",
                                                                  "offset": 1}},
    {"camera": ["c"]}, {"camera": "has/slash"}, {"camera": " lead"}, {"camera": "x" * 65},
    {"camera": "tab\tin"}, {"worker": "w" * 500}, {"maybe_duplicate": "yes"},
])
def test_every_malformed_field_is_a_wire_error(change):
    import json

    d = _score_dict() | change
    with pytest.raises(WireError) as e:
        Score.from_bytes(json.dumps(d).encode())
    assert e.value.reason == "bad_message"


def test_missing_fields_nan_and_size_are_wire_errors():
    import json

    d = _score_dict()
    del d["decision"]
    for bad in (json.dumps(d).encode(), b'{"schema": 1, "kind": "score", "score": NaN}', b"[]",
                b'{"schema": []}', b'{"schema": {"a": 1}}', b'{"schema": true}',
                b"", None, b"{" * 100_000, b'"' + b"x" * (17 << 20) + b'"'):
        with pytest.raises(WireError):
            Score.from_bytes(bad)
    assert Score.from_bytes(json.dumps(_score_dict()).encode()).seq == 2**62


def test_labels_are_signed_and_checked():
    from linewatch.wire import LABEL_KEY_ENV, label_key

    key = b"k" * 32
    lab = Label(item_id="Line 1:5", camera="Line 1", line="L", seq=5, verdict="normal", operator="ann")
    signed = lab.signed(key)
    assert Label.from_signed_bytes(signed.to_bytes(), key) == signed
    non_ascii = signed.to_bytes().replace(signed.sig.encode(), ("é" * 64).encode())
    for data, with_key, reason in [
            (lab.to_bytes(), key, "unsigned"),
            (non_ascii, key, "bad_signature"),
            (signed.to_bytes(), b"x" * 32, "bad_signature"),  # signed with another key
            (signed.to_bytes().replace(b'"normal"', b'"defect"'), key, "bad_signature")]:  # altered
        with pytest.raises(WireError) as e:
            Label.from_signed_bytes(data, with_key)
        assert e.value.reason == reason
    assert label_key({}) is None
    with pytest.raises(ValueError, match="at least 16"):
        label_key({LABEL_KEY_ENV: "short"})


def test_ids_follow_one_rule():
    from linewatch.wire import check_id

    for good in ("cam-1", "Line 1", "a", "cam_7.b@site+2"):
        assert check_id("camera", good) == good
    for bad in ("", " x", "x ", "a:b", "a/b", "x" * 65, "ünï", "a\nb"):
        with pytest.raises(WireError):
            check_id("camera", bad)
    with pytest.raises(WireError):
        meta(camera="a:b")


def test_images_from_outside_are_checked_before_decoding():
    from conftest import jpeg_declaring

    from linewatch.images import decode_limited

    with pytest.raises(WireError) as e:
        decode_limited(jpeg_declaring(20000, 20000), 1 << 20, 40_000_000)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(WireError) as e:
        decode_limited(b"GIF89a....", 1 << 20, 40_000_000)
    assert e.value.reason == "not_an_image"
    assert decode_limited(_jpeg(), 1 << 20, 40_000_000).shape == (24, 32, 3)


def test_dead_letters_round_trip_through_the_contract():
    from linewatch.wire import dead_letter_record, parse_dead_letter, without_payload

    m = meta(camera="Line 1", seq=12)
    k, v, h = dead_letter_record(b"Line 1", b"x" * 100, m.headers(), WireError("scoring_failed", "boom"),
                                 FrameRef("t.frames", 3, 40), "w1", max_copy_bytes=64)
    dl = parse_dead_letter(h)
    assert (dl.reason, dl.cause, dl.camera, dl.seq, dl.original_bytes) == (
        "scoring_failed", "failed", "Line 1", 12, 100)
    assert str(dl.source) == "t.frames/3/40" and len(v) == 64
    _, v2, h2 = without_payload(k, v, h)
    assert v2 == b"" and parse_dead_letter(h2).original_bytes == 100
    with pytest.raises(WireError):
        parse_dead_letter([("lw-dl-reason", b"because")])
    # a null header value is legal on the wire; the dead letter must still be sendable
    _, _, h3 = dead_letter_record(b"k", b"v", [("lw-schema", None), ("x", b"1")],
                                  WireError("missing_header", "x"), FrameRef("t", 0, 1), "w", 10)
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in h3) and ("lw-schema", b"") in h3


def test_verdicts_arriving_one_by_one_are_learned_together():
    """Operators answer one item at a time; each verdict learned on arrival rescored the whole
    holdout, blocking the worker's loop for seconds per verdict."""
    import consumers.labels as labels
    from inference.scoring import NoopScorer

    learner = labels.ReferenceLearner(NoopScorer(), [], None, "w-coalesce")
    image = np.zeros((8, 8, 3), np.uint8)
    for i in range(5):
        learner.apply([labels.Verdict(Label(item_id=f"c:{i}", camera="c", line="l", seq=i,
                                            verdict="normal", operator="op"), image)])
    assert not learner.due(settle_s=60, max_delay_s=60)  # more may be on their way
    assert learner.due(settle_s=0)
    assert learner.learn().added == 5 and len(learner.learned) == 5
    assert not learner.due(settle_s=0)


def test_demo_camera_waits_while_more_than_max_lag_frames_are_undecided():
    import threading

    from linewatch.demo import Backpressure

    stop = threading.Event()
    bp = Backpressure(2, stop)
    assert all(bp.wait_to_send() for _ in range(3))  # up to 3 taken: at most 2 undecided before each
    sent = threading.Event()
    camera = threading.Thread(target=lambda: bp.wait_to_send() and sent.set(), daemon=True)
    camera.start()
    assert not sent.wait(0.3)  # a negative check: 3 undecided, the 4th frame must not be taken
    bp.decided(1)
    assert sent.wait(10)  # one decision frees it
    sent.clear()
    late = threading.Thread(target=lambda: sent.set() if not bp.wait_to_send() else None, daemon=True)
    late.start()
    stop.set()  # a stopping demo releases a waiting camera, which then takes no frame
    assert sent.wait(10)
    never = Backpressure(0, threading.Event())
    assert all(never.wait_to_send() for _ in range(1000))  # 0: never waits
    # no decision at all for stall_s: the cameras give up and the demo fails, instead of hanging
    stuck = Backpressure(1, threading.Event(), stall_s=0.5)
    assert stuck.wait_to_send() and stuck.wait_to_send() and not stuck.wait_to_send()
    assert stuck.stalled


def test_demo_cameras_land_on_distinct_partitions():
    """One camera = one key = one partition: the demo's cameras must cover distinct partitions,
    or two of them could sit on partitions one worker owns while another worker idles."""
    from kafka.partitioner.default import murmur2

    from linewatch.demo import PARTITIONS, camera_names

    names = camera_names(6)
    parts = [(murmur2(n.encode()) & 0x7FFFFFFF) % PARTITIONS for n in names]
    assert parts[:PARTITIONS] == list(range(PARTITIONS)) and len(set(names)) == 6
