"""A fleet nothing can stop: workers joining, leaving and dying, poison records, model and
broker failures. Real broker (Tansu), real ``linewatch worker`` processes, real frames.

Each test reproduces a defect seen on e170531 (see the README's reliability section); the
model failures are made on purpose with the worker's hidden ``--inject-faults`` option
(``inference/faults.py``). Not covered here: topics that do not exist or that a worker may
not write to (the embedded broker creates any topic on first use and has no ACLs).
"""

from __future__ import annotations

import base64
import signal

import cv2
import numpy as np
import pytest
from conftest import LABEL_KEY, Camera, collect, frame_meta, jpeg_declaring, send_raw, wait_for

from linewatch.broker import EmbeddedBroker, create_topics
from linewatch.wire import Label, Topics

KEY_ENV = {"LINEWATCH_LABEL_KEY": LABEL_KEY}


def _frames(broker: EmbeddedBroker, topics: Topics, seqs: range, camera: str = "cam-f",
            marked: set[int] = frozenset(), size: int = 160) -> set[tuple[str, str]]:
    """Synthetic conveyor frames as raw records; ``marked`` ones get a magenta corner (the
    ``poison`` fault of --inject-faults makes the model crash on exactly those)."""
    from producers.sources import SyntheticConveyor

    conveyor = SyntheticConveyor(seed=11, defect_rate=0.0, size=(size, size))
    records = []
    for seq in seqs:
        rgb = conveyor.frame(seq).image.copy()
        if seq in marked:
            rgb[:16, :16] = (255, 0, 255)
        jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        records.append((jpeg, frame_meta(seq, size, size, camera=camera).headers()))
    send_raw(broker, topics.frames, records)
    return {(camera, str(s)) for s in seqs}


# --- rebalances ------------------------------------------------------------------------------
def test_a_worker_joining_a_sparse_stream_crashes_nobody(broker, topics, workers):
    """e170531: A scored the batch in hand inside its revoke callback, on kafka-python's network
    thread, which refuses to block: A exited with code 1 and B got no partitions for minutes."""
    a = workers("A", "--scorer", "noop", "--max-wait-ms", "3000")
    a.wait_ready()
    # 4 cameras, 2 frames/s in all: A nearly always holds a partly filled batch while it polls
    cams = [Camera(broker, topics, frames=12, fps=0.5, camera=f"cam-{i}", seed=i) for i in range(4)]
    collect(broker, topics, lambda t: len(t.scores) >= 4, 60)
    b = workers("B", "--scorer", "noop", "--max-wait-ms", "3000")
    b.wait_ready(60)  # B was given partitions
    assert a.proc.poll() is None, a.log.read_text()
    seen = collect(broker, topics, lambda t: {"A", "B"} <= {s.worker for s in t.scores.values()}, 60)
    assert seen
    a.signal(signal.SIGKILL)  # and when a member dies, the other carries on alone
    sent = lambda: set().union(*(c.sent for c in cams))  # noqa: E731
    t = collect(broker, topics, lambda t: all(c.done.is_set() for c in cams) and sent() <= t.accounted,
                120).tally
    assert b.proc.poll() is None, b.log.read_text()
    assert len(sent()) == 48 and not sent() - t.accounted
    assert not t.unmarked_duplicates, t.unmarked_duplicates
    assert "RuntimeError" not in a.log.read_text() + b.log.read_text()
    assert b.stop() == 0


def test_a_batch_waiting_for_its_model_is_given_up_when_its_partitions_move(broker, topics, workers):
    """The riskiest path of the rebalance design: A holds a batch uncommitted while its model is
    down (retrying, partitions paused, still in the group) and B joins. A's batch partitions are
    revoked while it waits: A abandons the batch uncommitted and reads again what stays its own;
    nothing is lost, no re-scored frame is unmarked, both keep going."""
    a = workers("A", "--scorer", "noop", "--max-batch", "4", "--inject-faults", "down_after=1,down_for=25")
    a.wait_ready()
    want = _frames(broker, topics, range(1), camera="cam-0", size=64)
    collect(broker, topics, lambda t: want <= t.accounted, 60)  # the model's one good call
    for i in range(4):
        want |= _frames(broker, topics, range(1, 5), camera=f"cam-{i}", size=64)
    wait_for(lambda: "the model fails even on a reference image" in a.log.read_text(), 60,
             "A to hold a batch for its model")
    b = workers("B", "--scorer", "noop", "--max-batch", "4")
    b.wait_ready(60)
    t = collect(broker, topics, lambda t: want <= t.accounted, 120).tally
    assert "abandoned uncommitted" in a.log.read_text()
    assert not t.dead and not t.unmarked_duplicates, t.unmarked_duplicates
    assert a.proc.poll() is None and b.proc.poll() is None
    assert a.stop() == 0 and b.stop() == 0


# --- poison records on .labels ---------------------------------------------------------------
def _label(seq: int, image: bytes | None = None, verdict: str = "normal") -> Label:
    return Label(item_id=f"cam-f:{seq}", camera="cam-f", line="L", seq=seq, verdict=verdict,
                 operator="op", frame_jpeg_b64=base64.b64encode(image).decode() if image else None)


def json_sig(value: bytes) -> bytes:
    import json

    return json.loads(value)["sig"].encode()


def _bad_labels() -> list[tuple[bytes, str]]:
    """(record value, reason it must be refused with)."""
    good = _label(1, jpeg_declaring(16, 16)).signed(LABEL_KEY.encode()).to_bytes()

    def edit(**changes: object) -> bytes:
        """The good label changed, and signed again: malformed, yet carrying a valid signature
        (the contract: HMAC-SHA256 over the canonical JSON of every field but "sig")."""
        import hashlib
        import hmac
        import json

        d = json.loads(good)
        d.pop("sig")
        for k, v in changes.items():
            if v is ...:
                d.pop(k)
            else:
                d[k] = v
        canonical = json.dumps(d, separators=(",", ":"), sort_keys=True).encode()
        d["sig"] = hmac.new(LABEL_KEY.encode(), canonical, hashlib.sha256).hexdigest()
        return json.dumps(d).encode()

    return [
        (edit(seq=...), "bad_message"),                      # a missing field
        (edit(camera=None), "bad_message"),                  # a null value
        (edit(frame_jpeg_b64=12345), "bad_message"),         # a number where base64 belongs
        (edit(item_id=["cam-f", 1]), "bad_message"),         # a list where an item id belongs
        (edit(seq=2**70), "bad_message"),                    # not a 64-bit sequence number
        (b"\x00\xffnot json", "bad_message"),
        (edit(schema=7), "unknown_schema"),
        (edit(schema=[1]), "unknown_schema"),                # not even a number
        (good.replace(json_sig(good), ("é" * 64).encode()), "bad_signature"),  # not hex
        (_label(2, jpeg_declaring(16, 16)).to_bytes(), "unsigned"),                  # forged
        (good.replace(b'"operator":"op"', b'"operator":"mallory"'), "bad_signature"),  # altered
        (_label(3, jpeg_declaring(20000, 20000)).signed(LABEL_KEY.encode()).to_bytes(), "bad_image"),
    ]


def test_poison_labels_are_counted_and_skipped_at_start_and_while_running(broker, topics, workers):
    """e170531: one malformed label made the running worker exit, and every worker after it exit
    before it was ready (.labels is kept forever); a label carrying a 20000x20000 JPEG was learned
    (RSS 0.6 -> 3.0 GB); anyone who could write to Kafka could teach a worker a "normal"."""
    from kafka import KafkaProducer

    bad = _bad_labels()
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=16 << 20)
    for value, _ in bad:
        p.send(topics.labels, key=b"cam-f", value=value)
    p.flush()
    w = workers("L", env=KEY_ENV)
    w.wait_ready()
    want = _frames(broker, topics, range(10))
    collect(broker, topics, lambda t: want <= t.accounted, 90)
    for value, _ in bad:  # the same again while it runs, then one genuine verdict
        p.send(topics.labels, key=b"cam-f", value=value)
    from producers.sources import SyntheticConveyor

    normal = cv2.imencode(".jpg", SyntheticConveyor(seed=2).frame(5, allow_defect=False).image)[1]
    genuine = _label(9, normal.tobytes()).signed(LABEL_KEY.encode())
    p.send(topics.labels, key=b"cam-f", value=genuine.to_bytes())
    p.flush()
    p.close()
    wait_for(lambda: w.metric("linewatch_learned_normals") == 1, 60, "the genuine verdict learned")
    assert w.proc.poll() is None, w.log.read_text()
    for reason in {r for _, r in bad}:
        expected = 2 * sum(r == reason for _, r in bad)
        assert w.metric("linewatch_records_rejected_total", reader="worker-labels", reason=reason) \
            == expected, reason
    assert w.metric("linewatch_labels_applied_total") == 1  # nothing refused was applied
    assert w.stop() == 0


# --- model failures --------------------------------------------------------------------------
def test_transient_model_errors_are_retried_and_only_a_frame_that_fails_alone_is_dead_lettered(
        broker, topics, workers):
    """e170531: one model error dead-lettered the whole batch as scoring_failed and committed it."""
    w = workers("M", "--inject-faults", "fail_every=3,poison=255:0:255", "--max-batch", "4")
    w.wait_ready()
    want = _frames(broker, topics, range(24), marked={7, 19})
    t = collect(broker, topics, lambda t: want <= t.accounted, 120).tally
    assert {k: (dl.reason, dl.cause) for k, dl in t.dead.items()} == {
        ("cam-f", "7"): ("scoring_failed", "failed"), ("cam-f", "19"): ("scoring_failed", "failed")}
    assert len(t.scores) == 22 and t.duplicates == 0
    assert w.metric("linewatch_model_errors_total") >= 8  # retries happened, and were needed
    assert w.metric("linewatch_dead_letters_total", cause="failed") == 2
    assert w.metric("linewatch_dead_letters_total", cause="bad_input") == 0
    assert w.proc.poll() is None and w.stop() == 0


def test_a_model_that_is_down_holds_its_frames_until_it_is_back(broker, topics, workers):
    """A device lost for a while is not the frames' fault: nothing is dead-lettered, the batch
    stays uncommitted and is scored when the model answers again."""
    w = workers("D", "--inject-faults", "down_after=1,down_for=8")
    w.wait_ready()
    want = _frames(broker, topics, range(12))
    t = collect(broker, topics, lambda t: want <= t.accounted, 120).tally
    assert not t.dead and set(t.scores) == want
    log = w.log.read_text()
    assert "the model fails even on a reference image" in log
    assert w.metric("linewatch_model_up") == 1  # and it says so once it is back
    assert w.stop() == 0


# --- outputs the cluster will not take -------------------------------------------------------
def test_an_output_refused_as_too_large_is_sent_smaller(broker, topics, workers):
    """e170531: a review item over the producer's size limit raised out of send() and killed the
    worker. Now the smaller form goes out (and is counted)."""
    # every frame goes to review; noisy 512 px frames make review items of ~0.47 MB, over the
    # 100 kB + 256 kB request limit that --max-frame-bytes 100000 gives the worker's producer
    w = workers("S", "--scorer", "noop", "--alert-threshold", "10", "--review-threshold", "-1",
                "--max-frame-bytes", "100000")
    w.wait_ready()
    rng = np.random.default_rng(0)
    records = []
    for seq in range(4):
        noise = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        jpeg = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 40])[1].tobytes()
        assert len(jpeg) < 100000
        records.append((jpeg, frame_meta(seq, 512, 512, camera="cam-s").headers()))
    send_raw(broker, topics.frames, records)
    want = {("cam-s", str(s)) for s in range(4)}
    t = collect(broker, topics, lambda t: want <= set(t.reviews) and want <= t.accounted, 60).tally
    assert set(t.scores) == want
    assert w.metric("linewatch_outputs_shrunk_total") == 4
    assert w.proc.poll() is None and w.stop() == 0


def test_a_broker_that_stalls_mid_delivery_delays_frames_but_loses_none(tmp_path, references):
    """Producer timeouts are retried, never raised out of the loop (e170531 raised
    KafkaTimeoutError past its retry loop when a flush did not finish)."""
    import os

    from conftest import WorkerProc

    with EmbeddedBroker(log_path=tmp_path / "b.log") as own:
        t = Topics("stall")
        create_topics(own.bootstrap, t, partitions=2)
        w = WorkerProc(own, t, references, tmp_path, "stall", "g-stall",
                       "--scorer", "noop", "--delivery-timeout-ms", "2000",
                       "--inject-faults", "slow=4")
        try:
            w.wait_ready()
            want = _frames(own, t, range(4))
            wait_for(lambda: "injected: a slow model call" in w.log.read_text(), 30,
                     "the worker to be inside its 4 s model call")
            own_pid = own.pid
            os.kill(own_pid, signal.SIGSTOP)  # the batch's outputs time out
            try:
                wait_for(lambda: "not delivered" in w.log.read_text(), 30, "a failed delivery")
            finally:
                os.kill(own_pid, signal.SIGCONT)
            want |= _frames(own, t, range(4, 8))
            tally = collect(own, t, lambda x: want <= x.accounted, 90).tally
            assert set(tally.scores) == want and not tally.unmarked_duplicates
            assert w.metric("linewatch_output_delivery_retries_total") >= 1
            assert w.proc.poll() is None and w.stop() == 0
        finally:
            if w.proc.poll() is None:
                w.proc.kill()


@pytest.mark.parametrize("cameras", [6])
def test_state_keyed_by_camera_is_bounded(broker, topics, workers, cameras):
    """Camera ids come from frame headers: series and drift windows per camera are capped, and
    frames over the cap are still scored, counted under camera="_other"."""
    w = workers("C", "--scorer", "noop", "--max-cameras", "3")
    w.wait_ready()
    want: set[tuple[str, str]] = set()
    for i in range(cameras):
        want |= _frames(broker, topics, range(2), camera=f"cam-{i}", size=64)
    collect(broker, topics, lambda t: want <= t.accounted, 60)
    tracked = {c for c in (f"cam-{i}" for i in range(cameras))
               if w.metric("linewatch_frames_scored_total", camera=c) > 0}
    assert len(tracked) == 3
    assert w.metric("linewatch_frames_scored_total", camera="_other") == 2 * (cameras - 3)
    assert w.metric("linewatch_cameras_tracked") == 3 and w.metric("linewatch_camera_limit") == 3
    assert w.stop() == 0


# --- per-frame extras -------------------------------------------------------------------------
def test_a_failure_explaining_or_watching_one_frame_affects_that_frame_only(broker, topics):
    """e170531: an exception in the defect words or in drift for one frame escaped the loop and
    crash-looped the worker on that frame. In-process worker (the words need a CLIP model the
    command line would load; the failing parts are plain callables here)."""
    import threading
    import uuid

    from consumers.worker import Worker, WorkerConfig
    from inference.calibration import Thresholds
    from inference.scoring import NoopScorer
    from monitoring.drift import DriftMonitor, DriftReference
    from producers.sources import SyntheticConveyor

    calls = {"n": 0}

    def describe(crop: np.ndarray) -> str:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("the text model failed on this crop")
        return "looks like a scratch (40%)"

    class PickyDrift(DriftMonitor):
        def observe(self, line, camera, *args, **kwargs):  # type: ignore[override]
            if camera == "cam-x":
                raise RuntimeError("drift statistics failed")
            return super().observe(line, camera, *args, **kwargs)

    normals = SyntheticConveyor(seed=1).normals(10)
    drift = PickyDrift(DriftReference.from_frames(normals, [0.0] * 10, [None] * 10), window=5)
    cfg = WorkerConfig(bootstrap=broker.bootstrap, thresholds=Thresholds(10.0, -1.0, 0, False),
                       topics=topics, group_id=f"g-{uuid.uuid4().hex[:6]}", worker_id="explain",
                       session_timeout_ms=6000, heartbeat_interval_ms=1000)
    worker = Worker(cfg, NoopScorer(), drift=drift, describe=describe)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        want = _frames(broker, topics, range(6), camera="cam-x") | _frames(broker, topics, range(6))
        t = collect(broker, topics, lambda t: want <= set(t.reviews) and want <= t.accounted, 90).tally
        assert set(t.scores) == want and not t.dead
        words = [r.explanation for r in t.reviews.values()]
        assert sum("looks like a scratch" in w for w in words) == 6  # the other 6 lost only words
        assert thread.is_alive()
    finally:
        worker.request_stop()
        thread.join(30)
    assert worker.stats.frames.scored == 12
    # a stopped worker withdraws its cameras' series: in a process that goes on (the demo, a
    # test run), a stale drift value must not keep an alert firing for a camera nobody scores
    from monitoring.metrics import REGISTRY

    stale = [s for fam in REGISTRY.collect() for s in fam.samples
             if s.labels.get("camera") in ("cam-x", "cam-f")]
    assert stale == [], stale[:5]
