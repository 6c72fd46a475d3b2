"""patch-knn with --stream-bank: each frame also compared with its camera's recent frames.

On real bottle photos from ../shared/data (skipped where absent) and a worker on a real
broker. What is checked: a frame never scores above what the references alone give it (the
thresholds' bound), normal frames score lower once their camera's bank is warm (the point of
it), defects stay above normals, banks are per camera and bounded, and a worker passes each
frame's camera and admits its committed frames. The quality figures on whole datasets come
from ``python -m benchmarks.stream_bank`` (README), not from here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from conftest import shared_data


@pytest.fixture(scope="module")
def bottle():
    from linewatch.images import read_rgb

    root = shared_data("mvtec_ad", "bottle")
    good = [read_rgb(p) for p in sorted((root / "train" / "good").glob("*.png"))[:12]]
    bad = [read_rgb(p) for kind in ("broken_large", "broken_small", "contamination")
           for p in sorted((root / "test" / kind).glob("*.png"))[:2]]
    return good, bad


@pytest.fixture(scope="module")
def backbone():
    from inference.backbones import DinoV2Backbone

    return DinoV2Backbone(image_size=224)


def test_a_warm_bank_lowers_normal_scores_never_raises_any_and_keeps_defects_apart(backbone, bottle):
    """One reference; a camera's bank of 6 other normal bottles. Before the bank holds
    --warmup frames a frame scores exactly as against the reference alone; after, no frame's
    score or map is above that, the unseen normal frames score lower, every defect still
    scores above every normal frame, and a camera with no bank is scored as before."""
    from inference.scoring import PatchKNNScorer

    good, bad = bottle
    s = PatchKNNScorer(backbone, stream_bank=8, warmup=4)
    s.fit(good[:1])
    first = s.score(good[1:7], ["cam"] * 6)
    alone = s.score(good[1:7])
    assert [r.score for r in first] == pytest.approx([r.score for r in alone], abs=1e-6)  # bank empty
    s.admit(first)
    assert len(s.banks.frames("cam")) == 6

    queries = good[7:12] + bad
    banked = s.score(queries, ["cam"] * len(queries))
    ref_only = s.score(queries)
    for b, r in zip(banked, ref_only, strict=True):
        assert b.score <= r.score + 1e-6
        assert b.reference_score == pytest.approx(r.score, abs=1e-6)  # what drift compares
        assert (b.anomaly_map <= r.anomaly_map + 1e-6).all()
    normal_b = np.array([r.score for r in banked[:5]])
    normal_r = np.array([r.score for r in ref_only[:5]])
    assert (normal_b < normal_r).all(), (normal_b.round(4), normal_r.round(4))
    defect_b = np.array([r.score for r in banked[5:]])
    assert defect_b.min() > normal_b.max(), (defect_b.round(4), normal_b.round(4))
    other = s.score(queries[:2], ["other-cam"] * 2)  # banks are per camera
    assert [r.score for r in other] == pytest.approx([r.score for r in ref_only[:2]], abs=1e-6)


@dataclass
class Rec:
    """A consumer record as the worker's processor reads it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list


def records(images, first_seq, camera="cam-a"):
    from linewatch.wire import FrameMeta
    from producers.producer import encode_frame

    out = []
    for n, im in enumerate(images):
        meta = FrameMeta(camera=camera, line="l1", seq=first_seq + n, capture_ns=1, encoding="png",
                         width=im.shape[1], height=im.shape[0])
        out.append(Rec("lw.frames", 0, first_seq + n, meta.key, encode_frame(im, "png"), meta.headers()))
    return out


def test_the_worker_admits_to_the_bank_what_the_references_alone_would_not_alert_on(backbone, bottle):
    """The worker's frame processor on real records: a frame that routes as normal only
    because its camera's bank lowered its score (against the references alone it would
    alert) does not enter the bank, so a defect that recurs can never vouch for itself; a
    frame the references alone pass does. (Measured on the streams: the same quality as
    admitting every frame that did not alert, `benchmarks.stream_bank --policies
    below-alert,references-below-alert`, README.)"""
    from consumers.process import FrameProcessor
    from inference.calibration import Thresholds
    from inference.scoring import PatchKNNScorer
    from linewatch.wire import Topics
    from monitoring.metrics import CameraSeries

    good, _ = bottle
    scorer = PatchKNNScorer(backbone, stream_bank=8, warmup=2)
    scorer.fit(good[:1])
    proc = FrameProcessor(scorer, Thresholds(1e9, 1e9, 0, False), Topics("lw"), "w-adm", 10**8, 10**8,
                          CameraSeries("w-adm"))
    proc.process(records(good[1:5], 0))
    proc.committed()
    key = ("l1", "cam-a")
    assert len(scorer.banks.frames(key)) == 4  # nothing alerts at 1e9: all four entered

    alone = [r.score for r in scorer.score(good[5:12])]
    banked = [r.score for r in scorer.score(good[5:12], [key] * 7)]
    # a frame whose bank score is below its references-only score, with an alert threshold between
    i = int(np.argmax(np.array(alone) - np.array(banked)))
    assert banked[i] < alone[i] - 1e-3, (banked, alone)
    gap = alone[i] - banked[i]
    proc.thresholds = Thresholds(banked[i] + gap / 2, banked[i] - gap / 4, 0, False)  # review, not alert
    sent = {o.topic for o in proc.process(records([good[5 + i]], 100))}
    assert Topics("lw").review in sent and Topics("lw").alerts not in sent, sent  # the bank decided
    proc.committed()
    assert len(scorer.banks.frames(key)) == 4  # routed, not admitted: the references alone alert

    proc.thresholds = Thresholds(1e9, 1e9, 0, False)
    proc.process(records([good[5 + i]], 101))
    proc.committed()
    assert len(scorer.banks.frames(key)) == 5  # the same frame, when the references pass it


def test_a_frame_dead_lettered_by_routing_stays_out_of_its_cameras_bank(backbone, bottle, monkeypatch):
    """A frame scored but dead-lettered ``processing_failed`` (routing it failed with and
    without explanations) leaves no trace in its camera's bank, nor, zero-shot, in the score
    window its camera's thresholds come from: it may be replayed from the dead letters and
    would then meet itself there. Routing's failure is injected; the processor, scorers,
    banks and windows are the real ones."""
    import consumers.process as process
    from consumers.process import FrameProcessor
    from inference.calibration import StreamThresholds, Thresholds
    from inference.scoring import PatchKNNScorer
    from inference.settings import ScorerSettings
    from linewatch.wire import Topics, parse_dead_letter
    from monitoring.metrics import CameraSeries

    good, _ = bottle
    scorer = PatchKNNScorer(backbone, stream_bank=8, warmup=2)
    scorer.fit(good[:1])
    proc = FrameProcessor(scorer, Thresholds(1e9, 1e9, 0, False), Topics("lw"), "w-dl", 10**8, 10**8,
                          CameraSeries("w-dl"))
    real_route = process.route

    def route(meta, *args, **kwargs):
        if meta.seq == 2:
            raise RuntimeError("injected: this frame cannot be routed")
        return real_route(meta, *args, **kwargs)

    monkeypatch.setattr(process, "route", route)
    outs = proc.process(records(good[1:5], 0))
    proc.committed()
    dead = [parse_dead_letter(o.headers) for o in outs if o.topic == Topics("lw").deadletter]
    assert [(d.reason, d.source.offset) for d in dead] == [("processing_failed", 2)], dead
    assert len(scorer.banks.frames(("l1", "cam-a"))) == 3  # the three routed frames, not the fourth

    # a zero-shot camera: nor does it enter its bank or the window its thresholds come from
    mutual = ScorerSettings(method="mutual", warmup=2).build()
    windows = StreamThresholds(min_scores=2)
    proc = FrameProcessor(mutual, Thresholds(1e9, 1e9, 0, False), Topics("lw"), "w-dl0", 10**8, 10**8,
                          CameraSeries("w-dl0"), stream_thresholds=windows)
    proc.process(records(good[5:8], 10))  # warm-up: scored against each other, not observed
    proc.committed()
    proc.process(records(good[1:5], 0))  # seq 2 again cannot be routed
    proc.committed()
    assert len(mutual.banks.frames(("l1", "cam-a"))) == 3 + 3
    assert windows.count(("l1", "cam-a", "mutual")) == 3


def test_a_bank_that_fails_falls_back_to_the_references_and_says_so(backbone, bottle, caplog):
    """A camera's bank that cannot be matched (here a frame of another feature size in it) is
    not the frame's fault: its frames are scored against the references alone (the bound the
    thresholds hold for), the failure is logged and counted, and other cameras go on."""
    import torch

    from inference.scoring import PatchKNNScorer

    good, _ = bottle
    s = PatchKNNScorer(backbone, stream_bank=8, warmup=2)
    s.fit(good[:1])
    s.admit(s.score(good[1:3], ["ok", "ok"]))
    for _ in range(2):
        s.banks.add("broken", torch.zeros(256, 7, dtype=torch.float16))
    got = s.score(good[3:5], ["broken", "ok"])
    alone = s.score(good[3:5])
    assert got[0].score == pytest.approx(alone[0].score, abs=1e-6)
    assert got[1].score < alone[1].score
    assert s.bank_failures == 1 and "references alone" in caplog.text


def test_banks_are_bounded_per_camera_and_in_cameras(caplog):
    """A camera's bank keeps its newest --stream-bank frames; past max_streams cameras the
    least recently fed is forgotten, and that is logged; forget() drops a camera; with
    --stream-bank 0 nothing is kept and frames need no camera."""
    from inference.backbones import DinoV2Backbone
    from inference.scoring import PatchKNNScorer

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(7)]
    s = PatchKNNScorer(DinoV2Backbone(image_size=56), stream_bank=4, warmup=2, max_streams=2)
    s.fit(frames[:1])
    assert s.per_camera
    s.admit(s.score(frames[1:7], ["a"] * 6))
    assert len(s.banks.frames("a")) == 4  # the newest 4
    s.admit(s.score(frames[1:2], ["b"]))
    s.admit(s.score(frames[1:2], ["c"]))
    assert s.banks.frames("a") == [] and len(s.banks.frames("b")) == len(s.banks.frames("c")) == 1
    assert s.banks.forgotten == 1 and "forgot the bank of 'a'" in caplog.text
    s.forget(["b"])
    assert s.banks.frames("b") == []
    with pytest.raises(ValueError, match="stream keys"):
        s.score(frames[:2], ["a"])

    off = PatchKNNScorer(DinoV2Backbone(image_size=56))
    off.fit(frames[:1])
    assert not off.per_camera
    off.admit(off.score(frames[1:3], ["a", "a"]))
    assert off.banks.frames("a") == []


def test_stream_bank_is_refused_where_it_would_be_ignored_or_cannot_work():
    from inference.settings import ScorerSettings, SettingsError

    for kw, says in [({"stream_bank": 4}, "2 <= warmup <= stream bank"),
                     ({"stream_bank": -1}, "give 0"),
                     ({"stream_bank": 1000}, "at most 256"),
                     ({"stream_bank": 32, "zoom": True}, "does not go with --zoom"),
                     ({"stream_bank": 32, "adapt_steps": 10}, "does not go with --adapt-steps"),
                     ({"method": "mutual", "stream_bank": 32}, "patch-knn's"),
                     ({"warmup": 4}, "would be ignored")]:
        with pytest.raises(SettingsError, match=says):
            ScorerSettings(**kw)
    assert ScorerSettings(stream_bank=32, warmup=4).build().per_camera
    assert ScorerSettings(stream_bank=64, warmup=40).warmup == 40  # mutual's --bank-size is not its bound


def test_evaluate_refuses_stream_bank_it_would_ignore(capsys):
    from linewatch.cli import main

    rc = main(["evaluate", "--data", str(shared_data("mvtec_ad", "bottle")), "--shots", "1",
               "--stream-bank", "16"])
    assert rc == 2 and "add --protocol stream" in capsys.readouterr().err


def test_a_worker_with_a_stream_bank_scores_each_frame_at_most_as_without(broker, topics, workers,
                                                                           references, tmp_path):
    """Two workers, one with --stream-bank 8 --warmup 2, each on its own copy of the same
    camera's 30 frames (the same seed: the same JPEG bytes). Every frame is scored by both
    (nothing lost), never higher with the bank, and lower for most frames once the camera's
    bank holds committed frames: the worker passes each frame's camera and admits what it
    committed. Drift compares the references-only scores with the --holdout frames', so both
    workers publish the same score drift (the bank lowers live scores, not the scale)."""
    import time
    import uuid

    import cv2
    from conftest import Camera, WorkerProc, collect

    from consumers.config import WorkerConfig
    from linewatch.broker import create_topics
    from linewatch.wire import Topics
    from producers.sources import SyntheticConveyor

    other = Topics(f"t{uuid.uuid4().hex[:10]}")
    create_topics(broker.bootstrap, other, partitions=4)
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    for i, im in enumerate(SyntheticConveyor(seed=8).normals(20)):
        cv2.imwrite(str(holdout / f"{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    drift = ("--holdout", str(holdout), "--drift-window", "20")
    plain = workers("w-plain", *drift)
    banked = WorkerProc(broker, other, references, tmp_path, "w-bank", f"g-{other.prefix}",
                        "--stream-bank", "8", "--warmup", "2", *drift)
    try:
        plain.wait_ready()
        banked.wait_ready()
        assert "--stream-bank 8: each camera's frames are also compared" in banked.log.read_text()
        got = {}
        for name, t in (("plain", topics), ("bank", other)):
            cam = Camera(broker, t, frames=30, fps=0, camera="cam-s", seed=11, defect_rate=0.0)
            tally = collect(broker, t, lambda tl, c=cam: c.done.is_set() and c.sent <= tl.accounted
                            and not tl.unrouted).tally
            assert len(tally.scores) == 30 and not tally.dead
            got[name] = {s.seq: s.score for s in tally.scores.values()}
        assert got["plain"].keys() == got["bank"].keys()
        diffs = np.array([got["bank"][k] - got["plain"][k] for k in sorted(got["plain"])])
        assert (diffs <= 1e-5).all(), diffs.round(5)
        # patch-knn has no scoring modes: no camera is shown in mutual scoring's warm-up
        assert banked.metric("linewatch_camera_scoring_mode", camera="cam-s") == 0
        # the bank is consulted from its 2nd committed frame: after the first batch at the latest
        assert (diffs < -1e-4).sum() >= 30 - WorkerConfig.max_batch - 2, diffs.round(5)
        # drift: both workers' windows end with the last frame (publishing is rate-limited, so
        # wait for it), and their score statistics agree: each compares references-only scores
        def drift(w):
            return [w.metric("linewatch_drift", camera="cam-s", statistic=stat)
                    for stat in ("score_ks", "score_psi")]

        def full(w):
            return w.metric("linewatch_drift_window_frames", camera="cam-s") == 20

        deadline = time.monotonic() + 60
        while not (full(plain) and full(banked) and drift(banked) == pytest.approx(drift(plain), abs=1e-4)):
            assert time.monotonic() < deadline, f"drift with the bank {drift(banked)}, without {drift(plain)}"
            time.sleep(0.2)
    finally:
        banked.stop()
