"""Zero-shot mutual scoring (inference/mutual.py): frames scored by the other frames of their
stream, no references. On real bottle photos from ../shared/data (skipped where absent); the
stream mechanics on small frames, so the file stays quick. The full-size quality figures
(bottle batch and stream, magnetic tile stream) come from `linewatch evaluate --method mutual
--shots 0`, quoted in the README, not from here."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_data

from inference.calibration import WARM_UP, StreamThresholds


def _bottle(n_good: int, kinds: dict[str, int]):
    from linewatch.evaluate import Sample, read_mask
    from linewatch.images import read_rgb

    root = shared_data("mvtec_ad", "bottle")
    good = sorted((root / "train" / "good").glob("*.png"))[:n_good]
    defects = []
    for kind, n in kinds.items():
        defects += [Sample(p, True, kind, root / "ground_truth" / kind / f"{p.stem}_mask.png")
                    for p in sorted((root / "test" / kind).glob("*.png"))[:n]]
    images = [read_rgb(p) for p in good] + [read_rgb(s.path) for s in defects]
    masks = [read_mask(s, (16, 16)) for s in defects]
    return images, masks


@pytest.fixture(scope="module")
def backbone():
    from inference.backbones import DinoV2Backbone

    return DinoV2Backbone(image_size=224)


@pytest.fixture(scope="module")
def bottle():
    return _bottle(8, {"broken_large": 2, "broken_small": 2, "contamination": 2})


def test_unlabeled_bottles_score_each_other_defects_highest_and_located(backbone, bottle):
    """No reference at all: 8 normal bottles and 6 defective ones, scored against each other.
    Every defective bottle scores above every normal one, and each map's hottest patch lies on
    the defect (the mask, grown by a patch for the map's coarse grid)."""
    import cv2

    from inference.mutual import MutualScorer

    images, masks = bottle
    res = MutualScorer(backbone).score_batch(images)
    scores = np.array([r.score for r in res])
    assert scores[8:].min() > scores[:8].max(), scores.round(3)
    for r, mask in zip(res[8:], masks, strict=True):
        assert r.anomaly_map.shape == (16, 16) and r.mode == "mutual"
        near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert near.flat[int(r.anomaly_map.argmax())], "hottest patch off the defect"


def test_a_defect_repeated_in_a_few_other_frames_still_scores_high(backbone, bottle):
    """The lowest 30% of the per-frame distances, not the lowest one: a frame whose defect two
    other frames share (same part, same place) is still outvoted by the frames that show that
    place normal. With the single nearest frame (keep 1/11) it would look normal."""
    from inference.mutual import MutualScorer

    images, _ = bottle
    defect = images[8]  # broken_large
    others = [*images[:8], defect.copy(), defect.copy()]
    scores = {}
    s = MutualScorer(backbone)
    feats = s.features([defect, *others])
    normal = s._result(feats[1], s._patch_scores(feats[1], feats[2:9]), "mutual").score
    for keep in (0.3, 0.05):
        s.keep = keep
        scores[keep] = float(s._result(feats[0], s._patch_scores(feats[0], feats[1:]), "mutual").score)
    assert scores[0.05] < 1e-4  # its copies are at distance 0: plain nearest-frame scoring misses it
    assert scores[0.3] > 2 * normal, (scores, normal)


def test_confirmed_normals_that_repeat_each_other_are_kept_once(backbone, bottle):
    """Few-shot memory of a mutual scorer with --memory-tolerance: 6 confirmed bottles keep a
    fraction of their patches; every frame scores at least what the whole memory gives and
    within the per-layer bound of ``novel_rows``; the defects still outrank the normals."""
    from inference.mutual import MutualScorer

    images, _ = bottle
    normals, test = images[:6], images[6:]
    tol = 0.05
    exact, tolerant = MutualScorer(backbone), MutualScorer(backbone, memory_tolerance=tol)
    scores = {}
    for name, s in (("exact", exact), ("tolerant", tolerant)):
        s.fit(normals[:1])
        s.add_normals(normals[1:])
        scores[name] = np.array([r.score for r in s.score(test)])
        assert s.mode == "few-shot" and s.memory_size == 6  # frames confirmed, whatever is kept
    assert tolerant.memory_rows < exact.memory_rows / 2
    assert (scores["tolerant"] >= scores["exact"] - 1e-5).all()
    # per layer sqrt(d') <= sqrt(d) + sqrt(tol); the layers' mean (Jensen: the mean of square
    # roots is at most the root of the mean) and the top-1 % mean (of a rising, concave bound)
    # keep it: sqrt(s') <= sqrt(s) + sqrt(tol)
    assert (np.sqrt(scores["tolerant"]) <= np.sqrt(scores["exact"]) + tol ** 0.5 + 1e-4).all()
    assert (scores["tolerant"] > scores["exact"] + 1e-3).any()
    for sc in scores.values():
        assert sc[2:].min() > sc[:2].max()


def test_stream_banks_warm_up_bound_and_turn_few_shot(caplog):
    """Per-stream banks: the first frame has nothing to compare with (score 0, warm-up), frames
    of one call compare with each other while warming up, banks keep the newest bank_size
    frames, streams beyond max_streams are forgotten oldest first, and confirmed normals make
    the scorer few-shot. Small frames: this is about the bookkeeping."""
    from inference.backbones import DinoV2Backbone
    from inference.mutual import MutualScorer

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(8)]
    s = MutualScorer(DinoV2Backbone(image_size=56), bank_size=4, warmup=3, max_streams=2)
    first = s.score(frames[:1], ["a"])[0]
    assert (first.mode, first.score) == ("warm-up", 0.0)
    s.admit([first])
    pair = s.score(frames[1:3], ["a", "a"])
    assert [r.mode for r in pair] == ["warm-up", "warm-up"] and all(r.score > 0 for r in pair)
    s.admit(pair)
    assert s.bank_len("a") == 3
    again = s.score([frames[0]], ["a"])[0]  # in the bank: its own copy is the nearest frame
    assert again.mode == "mutual" and again.score < 1e-3
    s.admit(s.score(frames[3:8], ["a"] * 5))
    assert s.bank_len("a") == 4  # the newest 4
    s.admit(s.score(frames[:1], ["b"]) + s.score(frames[:1], ["c"]))
    assert s.bank_len("a") == 0 and s.bank_len("b") == s.bank_len("c") == 1  # a was oldest
    assert s.banks_forgotten == 1 and "forgot the bank of 'a'" in caplog.text  # said, not silent
    with pytest.raises(ValueError, match="stream keys"):
        s.score(frames[:2], ["a"])
    s.add_normals(frames[:1])
    assert s.mode == "few-shot"
    got = s.score(frames[:2], ["b", "b"])
    assert [r.mode for r in got] == ["few-shot"] * 2 and got[0].score < 1e-3 < got[1].score


def test_stream_thresholds_bound_the_alert_share_and_ignore_a_quota_with_no_defects():
    rng = np.random.default_rng(1)
    th = StreamThresholds(expected_anomaly_rate=0.05, window=400, min_scores=32, max_streams=2)
    for v in rng.normal(0.2, 0.01, 31):
        th.observe("cam", v)
    assert th.thresholds("cam") is None  # too few scores: the camera is still warming up
    normal = rng.normal(0.2, 0.01, 380)
    defects = rng.uniform(0.35, 0.6, 20)
    scores = np.concatenate([normal, defects])
    rng.shuffle(scores)
    for v in scores:
        th.observe("cam", v)
    t = th.thresholds("cam")
    assert t is not None and t.uncalibrated and "0.05" in t.uncalibrated
    assert normal.max() < t.alert <= defects.min() and t.review <= t.alert
    alerts = float(np.mean(scores[-400:] >= t.alert))
    assert alerts <= 0.05 + 1e-9
    # a camera with no defects at all: the quantile alone would alert 5% of its normal frames
    for v in rng.normal(0.2, 0.01, 400):
        th.observe("clean", v)
    clean = th.thresholds("clean")
    assert clean is not None and clean.alert > 0.2 + 4 * 0.01 * 0.9
    th.observe("third", 0.1)  # bounded: the least recently fed camera is forgotten
    assert th.count("cam") == 0 and th.count("clean") == 400
    assert WARM_UP.decide(1.999) == "review" and WARM_UP.decide(0.0) == "review"
    with pytest.raises(ValueError, match="expected anomaly rate"):
        StreamThresholds(expected_anomaly_rate=0.5)


def test_confirmed_normals_turn_a_zero_shot_line_few_shot_then_calibrated():
    """Operators' normal verdicts: every second one goes into the memory, the others are set
    aside; once there are enough for the conformal bound (false-alarm rate 0.25: 3), they
    calibrate the thresholds, and the scorer turns few-shot at that moment (as a worker sets
    it up: until then mutual scoring measured better than few-shot on so few normals)."""
    from consumers import labels
    from inference.backbones import DinoV2Backbone
    from inference.mutual import MutualScorer
    from linewatch.wire import Label

    rng = np.random.default_rng(2)
    s = MutualScorer(DinoV2Backbone(image_size=56), bank_size=4, warmup=2)
    s.fit([])
    learner = labels.ReferenceLearner(s, [], None, "w-zero", false_alarm_rate=0.25, review_rate=0.5,
                                      calibrate_from_verdicts=True)
    assert learner.calibration_needed == 3
    s.few_shot_after = None  # what consumers.assembly does: the learner says when

    def confirm(first: int, n: int) -> labels.LearnResult:
        learner.apply([labels.Verdict(Label(item_id=f"c:{i}", camera="c", line="l", seq=i,
                                            verdict="normal", operator="op"),
                                      rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
                       for i in range(first, first + n)])
        return learner.learn()

    got = confirm(0, 4)
    assert got.added == 4 and got.thresholds is None and s.memory_size == 2 and s.mode == "mutual"
    assert len(learner.calibration) == 2 and learner.holdout is None
    got = confirm(4, 2)
    assert s.memory_size == 3 and s.mode == "few-shot" and got.thresholds is not None
    assert got.thresholds.n_normals == 3 and got.thresholds.guaranteed
    assert got.thresholds.uncalibrated is None
    prepared = learner.holdout._prepared  # the calibration frames' features, kept
    got = confirm(6, 2)  # more verdicts: only the new calibration frame goes through the backbone
    assert learner.holdout._prepared is prepared and len(prepared.features) == 4
    assert got.thresholds is not None and got.thresholds.n_normals == 4 and s.memory_size == 4


def test_a_zero_shot_worker_warms_up_then_decides_each_camera_by_its_own_frames(
        broker, topics, tmp_path):
    """`linewatch worker --method mutual` with no references, no holdout, no thresholds, on a
    real broker: a camera's first frames go to review, marked warm-up and uncalibrated (the
    review page shows why), until its bank holds --warmup frames and 32 scores set its
    thresholds; then it is decided by mutual scoring, still shown uncalibrated in the scores
    and in /metrics. Nothing is lost. (Defect recall is the demo's and evaluate's to measure.)"""
    import os
    import subprocess
    import sys

    from conftest import REPO, Camera, collect, metric, wait_for

    ready, log = tmp_path / "w.ready", tmp_path / "w.log"
    cmd = [sys.executable, "-m", "linewatch", "worker", "--bootstrap-servers", broker.bootstrap,
           "--topic-prefix", topics.prefix, "--group-id", "g-zero", "--worker-id", "w-zero",
           "--method", "mutual", "--warmup", "2", "--bank-size", "4", "--expected-anomaly-rate", "0.1",
           "--metrics-port", "0", "--ready-file", str(ready), "--torch-threads", "1",
           "--no-learn-from-labels"]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 120, "the worker to start")
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert "zero-shot (mutual), no references" in text and "UNCALIBRATED" in text
        cam = Camera(broker, topics, frames=50, fps=0, camera="cam-zero", defect_rate=0.1)
        tally = collect(broker, topics, lambda t: cam.done.is_set() and cam.sent <= t.accounted
                        and not t.unrouted).tally
        scores = sorted(tally.scores.values(), key=lambda s: s.seq)
        assert len(scores) == 50 and not tally.dead
        assert all(not s.calibrated for s in scores)
        warm = [s.seq for s in scores if s.mode == "warm-up"]
        # warm-up lasts two phases, each ending at a batch's commit, so each may overrun by up
        # to a batch less one frame (batches are 1 to max_batch frames: frames queue while the
        # model loads): the bank needs --warmup 2 committed frames, then the camera's thresholds
        # need 32 committed mutual scores (CI once saw 44 = a first batch of 8 + 32 + 4)
        from consumers.config import WorkerConfig
        max_batch = WorkerConfig.max_batch  # the CLI worker's default
        most = (2 - 1 + max_batch) + (32 - 1 + max_batch)
        assert warm == list(range(len(warm))) and 2 + 32 <= len(warm) <= most, warm
        assert all(s.decision == "review" for s in scores[:len(warm)])
        assert {s.mode for s in scores[len(warm):]} == {"mutual"}
        assert all(s.review_threshold > 0 for s in scores[len(warm):])
        item = tally.reviews[("cam-zero", "0")]
        assert item.explanation.startswith("Uncalibrated: warm-up"), item.explanation
        url = wait_for(lambda: __import__("re").search(r"metrics on (http://\S+/metrics)",
                                                       log.read_text()), 10, "metrics").group(1)
        assert metric(url, "linewatch_thresholds_calibrated", worker="w-zero") == 0
        assert metric(url, "linewatch_camera_scoring_mode", camera="cam-zero", mode="mutual") == 1
        assert metric(url, "linewatch_camera_scoring_mode", camera="cam-zero", mode="warm-up") == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
