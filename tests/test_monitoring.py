"""Drift statistics against hand-computed values; rule, Alertmanager, compose and dashboard
files checked with the real tools (promtool, amtool, docker-compose); the alert log and
`grafana push` over real HTTP.

Not covered here: a real Grafana server (none is installable on the build machine). The
push test stops at Grafana's HTTP boundary: it checks the exact requests grafana-client
sends to a local HTTP server that answers like Grafana's API; dashboards' queries are run
against a real Prometheus in test_operations.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from monitoring import dashboards
from monitoring.drift import (
    DriftConfigError,
    DriftMonitor,
    DriftReference,
    image_quality,
    ks_statistic,
    ks_threshold,
    parse_thresholds,
    psi,
    psi_threshold,
    window_statistics,
)

REPO = Path(__file__).resolve().parent.parent
MON = REPO / "monitoring"


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, (f"{tool} is not installed: scripts/bootstrap installs it with apt "
                  "(prometheus, prometheus-alertmanager, docker-compose)")
    return path


# --- drift statistics, by hand -------------------------------------------------------------
def test_psi_matches_hand_computation() -> None:
    ref = np.arange(1, 11, dtype=float)  # 1..10; 2 bins split at the median 5.5
    cur = np.array([1, 2, 3, 9, 9, 9, 9, 9], dtype=float)  # 3 below, 5 above
    # counts + 0.5: p = (5.5, 5.5)/11, q = (3.5, 5.5)/9; PSI = sum (q - p) ln(q / p)
    p, q = np.array([0.5, 0.5]), np.array([3.5, 5.5]) / 9
    assert psi(ref, cur, bins=2) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-12)
    assert psi(ref, ref, bins=2) == pytest.approx(0.0, abs=1e-12)
    # an empty bin is smoothed, not infinite
    assert math.isfinite(psi(ref, np.full(5, 100.0), bins=2))
    # threshold: chi2(bins - 1) quantile at 0.999 x (1/n + 1/m); chi2_3(0.999) = 16.266
    assert psi_threshold(40, 100) == pytest.approx(16.2662 * (1 / 40 + 1 / 100), rel=1e-4)
    assert psi_threshold(10_000, 10_000) == 0.25


def test_psi_threshold_holds_its_false_alarm_rate() -> None:
    rng = np.random.default_rng(5)
    for n, m in [(40, 100), (50, 20)]:
        over = sum(psi(rng.normal(size=n), rng.normal(size=m)) > psi_threshold(n, m)
                   for _ in range(2000))
        assert over <= 10, (n, m, over)  # alpha = 0.001 -> ~2 expected; 10 is far out


def test_ks_matches_hand_computation_and_scipy() -> None:
    from scipy.stats import ks_2samp

    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([3.5, 4.5, 5.5])
    # F_a(3) = 0.75, F_b(3) = 0: the largest gap is 0.75
    assert ks_statistic(a, b) == pytest.approx(0.75)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=57), rng.normal(0.3, size=91)
    assert ks_statistic(x, y) == pytest.approx(ks_2samp(x, y).statistic)
    # c(0.001) = sqrt(-ln(0.0005)/2) = 1.9495
    assert ks_threshold(40, 100) == pytest.approx(1.94947 * math.sqrt(140 / 4000), rel=1e-4)


def test_image_quality_on_constructed_images() -> None:
    flat = np.full((100, 200, 3), 100, np.uint8)
    q = image_quality(flat)
    assert q[0] == pytest.approx(100, abs=0.5)   # brightness: mean luma
    assert q[1] == pytest.approx(0, abs=1e-9)    # contrast: no variation
    assert q[2] == pytest.approx(0, abs=1e-9)    # sharpness: no edges
    assert abs(q[3]) < 1 and abs(q[4]) < 1       # neutral grey: no chroma
    stripes = np.zeros((96, 96, 3), np.uint8)
    stripes[:, ::2] = 200                        # half the pixels at 200
    q = image_quality(stripes)
    assert q[0] == pytest.approx(100, abs=1) and q[1] == pytest.approx(100, abs=1)
    import cv2
    from skimage import data

    photo = np.repeat(data.brick()[..., None], 3, axis=2)  # a real texture photo
    sharp = image_quality(photo)[2]
    blurred = cv2.GaussianBlur(photo, (0, 0), 2.0)
    assert image_quality(blurred)[2] < 0.3 * sharp   # defocus removes edges relative to contrast
    dim = (photo * 0.5).astype(np.uint8)
    assert image_quality(dim)[2] == pytest.approx(sharp, rel=0.1)  # a dimmer lamp is not blur
    assert image_quality(dim)[0] == pytest.approx(image_quality(photo)[0] / 2, rel=0.02)
    red = flat.copy()
    red[..., 0] = 160                               # a red cast: a* rises
    assert image_quality(red)[3] > 10


def test_window_statistics_relative_changes_and_colour_cast() -> None:
    ref = DriftReference(scores=np.linspace(0, 1, 20),
                         quality=np.tile([100.0, 40.0, 500.0, 2.0, -1.0], (20, 1)))
    window_q = np.tile([70.0, 40.0, 250.0, 5.0, 3.0], (10, 1))
    s = window_statistics(ref, np.linspace(0, 1, 10), window_q, None)
    assert s["brightness"] == pytest.approx(-0.3)
    assert s["contrast"] == pytest.approx(0.0)
    assert s["sharpness"] == pytest.approx(-0.5)
    assert s["colour_cast"] == pytest.approx(5.0)  # (3, 4) in a*b*
    assert "embedding" not in s


def test_monitor_windows_cameras_and_embedding_threshold() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16)) + 5.0
    ref = DriftReference(rng.normal(size=50), np.tile([100.0, 30.0, 400.0, 0.0, 0.0], (50, 1)), emb)
    mon = DriftMonitor(ref, window=20, min_frames=10)
    for i in range(9):
        mon.observe("L", "a", 0.0, quality=ref.quality[i], embedding=emb[i])
    assert mon.snapshot() == {}  # fewer than min_frames: nothing to say yet
    for i in range(9, 40):
        mon.observe("L", "a", float(rng.normal()), quality=ref.quality[i], embedding=emb[i])
        mon.observe("L", "b", float(rng.normal()), quality=ref.quality[i] * [0.5, 1, 1, 1, 1],
                    embedding=emb[i] + 3.0 * np.eye(16)[0])  # the scene turned
    snap = mon.snapshot()
    assert snap[("L", "a")].frames == 20  # the window slides
    assert snap[("L", "a")].drifting() == []
    assert {"brightness", "embedding"} <= set(snap[("L", "b")].drifting())
    # the embedding threshold covers how far windows of normal frames wander, with margin
    thr = ref.embedding_threshold(20)
    from monitoring.drift import cosine_distance

    chance = [cosine_distance(emb[rng.integers(0, 50, 20)].mean(0), emb.mean(0)) for _ in range(200)]
    assert max(chance) < thr
    mon.forget([("L", "a"), ("L", "b")])
    assert mon.snapshot() == {}


def test_threshold_overrides_and_bad_settings() -> None:
    assert parse_thresholds(["brightness=0.2", "score_ks=0.5"]) == {"brightness": 0.2, "score_ks": 0.5}
    for bad in ["brightnes=0.2", "brightness", "brightness=x", "brightness=-1"]:
        with pytest.raises(DriftConfigError, match="drift threshold"):
            parse_thresholds([bad])
    ref = DriftReference(np.zeros(5), np.ones((5, 5)))
    assert DriftMonitor(ref, window=10, thresholds={"brightness": 0.05}).thresholds(10)["brightness"] == 0.05
    with pytest.raises(DriftConfigError, match="at least 5"):
        DriftMonitor(ref, window=2)
    with pytest.raises(DriftConfigError, match="at least 2"):
        DriftReference(np.zeros(1), np.ones((1, 5)))


def test_reference_round_trips_through_arrays() -> None:
    rng = np.random.default_rng(3)
    ref = DriftReference(rng.normal(size=7), rng.normal(size=(7, 5)), rng.normal(size=(7, 4)))
    back = DriftReference.from_arrays(ref.to_arrays())
    for k, v in ref.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[k], v)


# --- configuration files, with the real tools --------------------------------------------
def test_promtool_rule_unit_tests_pass() -> None:
    promtool = need("promtool")
    out = subprocess.run([promtool, "check", "rules", str(MON / "prometheus/rules/linewatch.rules.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "test", "rules", "linewatch.rules.test.yml"],
                         cwd=MON / "prometheus/tests", capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_prometheus_and_alertmanager_configs_are_valid() -> None:
    out = subprocess.run([need("promtool"), "check", "config", str(MON / "prometheus/prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([need("amtool"), "check-config", str(MON / "alertmanager/alertmanager.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_compose_config_validates() -> None:
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "ci-only", "LINEWATCH_LABEL_KEY": "ci-only-label-key-0123"}
    out = subprocess.run([need("docker-compose"), "-f", str(REPO / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    import yaml

    cfg = yaml.safe_load(out.stdout)
    services = set(cfg["services"])
    assert {"kafka", "producer", "worker", "review", "prometheus", "alertmanager", "grafana",
            "alert-log"} <= services
    gpu = cfg["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    # the mounted folders exist, so the provisioned stack finds its files
    for svc in ("prometheus", "alertmanager", "grafana"):
        binds = [v.split(":")[0] for v in cfg["services"][svc]["volumes"] if v.startswith("/")]
        assert binds, svc
        for source in binds:
            assert Path(source).exists(), (svc, source)
    # without the admin password the file refuses to render (no default password in production)
    env.pop("GRAFANA_ADMIN_PASSWORD")
    out = subprocess.run([need("docker-compose"), "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in out.stderr


def test_dashboard_files_are_generated_and_consistent() -> None:
    generated = dashboards.generate()
    on_disk = {p.name: p.read_text() for p in dashboards.DASHBOARD_DIR.glob("*.json")}
    assert set(on_disk) == set(generated), "run: python -m monitoring.dashboards"
    for name, doc in generated.items():
        assert on_disk[name] == dashboards.dumps(doc), f"{name} is stale: python -m monitoring.dashboards"
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))
        for p in doc["panels"]:
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            assert p["targets"] and all(t["expr"] for t in p["targets"])
            # every metric a panel names is one linewatch exports or a recording rule
            for t in p["targets"]:
                assert "linewatch" in t["expr"] or t["expr"].startswith(("ALERTS", "sum(up")), t["expr"]
    assert len(generated) == 4


# --- the alert log over HTTP ---------------------------------------------------------------
def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_alert_log_writes_one_line_per_alert(tmp_path: Path) -> None:
    from monitoring.alertlog import AlertLog, make_server

    out = tmp_path / "alerts.jsonl"
    server = make_server("127.0.0.1", 0, AlertLog(out))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/alertmanager"
    try:
        payload = {"version": "4", "status": "firing", "receiver": "linewatch-log", "alerts": [
            {"status": "firing", "labels": {"alertname": "LinewatchBrightnessDrift", "camera": "c1"},
             "annotations": {"summary": "c1 darker"}, "startsAt": "2026-01-01T00:00:00Z"},
            {"status": "resolved", "labels": {"alertname": "LinewatchBlurDrift", "camera": "c2"},
             "annotations": {}, "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2026-01-01T00:05:00Z"}]}
        assert _post(url, json.dumps(payload).encode())[0] == 200
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [(x["alertname"], x["status"]) for x in lines] == [
            ("LinewatchBrightnessDrift", "firing"), ("LinewatchBlurDrift", "resolved")]
        assert lines[0]["annotations"]["summary"] == "c1 darker"
        status, text = _post(url, b'{"not": "alertmanager"}')
        assert status == 400 and "Alertmanager" in text
        assert _post(url, b"not json")[0] == 400
        assert len(out.read_text().splitlines()) == 2  # rejected bodies write nothing
    finally:
        server.shutdown()


# --- grafana push, up to Grafana's HTTP boundary ---------------------------------------------
class _GrafanaAPI(BaseHTTPRequestHandler):
    """Answers the four calls `grafana push` makes, the way Grafana's HTTP API documents them."""

    seen: ClassVar[list[tuple[str, str, dict | None, str | None]]] = []
    folder_exists = False

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, None, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != "Bearer good-token":
            self._json(401, {"message": "invalid API key"})
        elif self.path == "/api/folders/linewatch" and not type(self).folder_exists:
            self._json(404, {"message": "folder not found"})
        else:
            self._json(200, {"uid": "linewatch", "title": "linewatch"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(("POST", self.path, body, self.headers.get("Authorization")))
        if self.path == "/api/folders":
            type(self).folder_exists = True
            self._json(200, {"uid": body["uid"], "title": body["title"]})
        else:
            uid = body["dashboard"]["uid"]
            self._json(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x", "version": 1})


def test_grafana_push_sends_every_dashboard_into_one_folder() -> None:
    _GrafanaAPI.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GrafanaAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = subprocess.run([sys.executable, "-m", "linewatch", "grafana", "push", "--url", url],
                             capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "GRAFANA_TOKEN": "good-token"})
        assert out.returncode == 0, out.stderr
        posts = [s for s in _GrafanaAPI.seen if s[0] == "POST"]
        assert posts[0][1] == "/api/folders" and posts[0][2]["uid"] == "linewatch"
        pushed = {p[2]["dashboard"]["uid"]: p[2] for p in posts[1:]}
        assert set(pushed) == {d.uid for d in dashboards.DASHBOARDS}
        for body in pushed.values():
            assert body["overwrite"] is True and body["folderUid"] == "linewatch"
            assert body["dashboard"]["id"] is None
        assert all(s[3] == "Bearer good-token" for s in _GrafanaAPI.seen)
        assert out.stdout.count("success") == 4
        # a wrong token: exit 2 and a message that says what to do
        out = subprocess.run([sys.executable, "-m", "linewatch", "grafana", "push", "--url", url,
                              "--token", "bad"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 2 and "401" in out.stderr and "service-account token" in out.stderr
    finally:
        server.shutdown()
    out = subprocess.run([sys.executable, "-m", "linewatch", "grafana", "push", "--url", url,
                          "--token", "x"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and f"could not reach Grafana at {url}" in out.stderr


# --- false-alarm check on a long stable stream of real scored frames -------------------------
@pytest.mark.slow
def test_no_drift_on_a_long_stable_stream() -> None:
    """1,000 frames of the conveyor (10 % with defects, lamp flicker +-3 %), scored by the real
    DINOv2 patch-knn, with the worker's default 100-frame window: no statistic crosses its
    threshold in any of the ~950 windows (a window starts reporting at 50 frames); then the
    same stream with the lamp at 60 % is caught. The rule's `for:` hold would add margin on top."""
    import torch

    from inference import create_scorer
    from inference.calibration import score_frames
    from producers.sources import SyntheticConveyor

    torch.set_num_threads(2)
    conveyor = SyntheticConveyor(seed=11, defect_rate=0.1, size=(256, 256))
    scorer = create_scorer("patch-knn", image_size=112)
    scorer.fit(conveyor.normals(4))
    holdout = conveyor.normals(40, offset=20_000_000)
    res = score_frames(scorer, holdout)
    mon = DriftMonitor(DriftReference.from_frames(holdout, [r.score for r in res],
                                                  [r.embedding for r in res]), window=100)
    crossings: dict[str, int] = {}
    worst: dict[str, float] = {}
    for start in range(0, 1000, 8):
        frames = [conveyor.frame(i).image for i in range(start, start + 8)]
        for im, r in zip(frames, scorer.score(frames), strict=True):
            mon.observe("L", "c", r.score, im, r.embedding)
            cam = mon.snapshot().get(("L", "c"))
            if cam is None:
                continue
            for k in cam.drifting():
                crossings[k] = crossings.get(k, 0) + 1
            for k, v in cam.statistics.items():
                worst[k] = max(worst.get(k, 0.0), abs(v) / cam.thresholds[k])
    assert crossings == {}, (crossings, worst)
    conveyor.brightness = 0.6
    for i in range(1000, 1060):  # 60 of the 100 window frames dimmed: about -24 %
        im = conveyor.frame(i).image
        r = scorer.score([im])[0]
        mon.observe("L", "c", r.score, im, r.embedding)
    assert "brightness" in mon.snapshot()[("L", "c")].drifting()


def test_camera_series_are_capped_and_forgotten_when_idle() -> None:
    """State keyed by camera ids (which come from outside) is bounded in number and in time."""
    from prometheus_client import REGISTRY

    from monitoring.metrics import FRAMES_SCORED, CameraSeries

    forgotten: list = []
    cams = CameraSeries("w-cap", max_cameras=2, idle_s=60, on_forget=forgotten.extend)

    def series(camera: str) -> float | None:
        return REGISTRY.get_sample_value("linewatch_frames_scored_total",
                                         {"line": "L", "camera": camera, "decision": "normal"})

    assert cams.admit("L", "a") == ("L", "a") and cams.admit("L", "b") == ("L", "b")
    assert cams.admit("L", "c") is None  # over the cap: counted as _other, no series of its own
    FRAMES_SCORED.labels(line="L", camera="a", decision="normal").inc()
    assert series("a") == 1 and series("c") is None
    assert REGISTRY.get_sample_value("linewatch_cameras_tracked", {"worker": "w-cap"}) == 2
    assert REGISTRY.get_sample_value("linewatch_camera_overflow_frames_total", {"worker": "w-cap"}) == 1
    import time

    later = time.monotonic() + 61
    assert cams.expire(later) == [("L", "a"), ("L", "b")] and forgotten == [("L", "a"), ("L", "b")]
    assert series("a") is None and len(cams) == 0  # the series went with the camera
    assert cams.admit("L", "c") == ("L", "c")


def test_clearing_camera_series_forgets_cameras_that_never_go_idle() -> None:
    """A stopping worker withdraws its series even with --camera-idle-s inf (clear() was
    expire(inf), which kept every camera: inf - seen <= inf)."""
    import math

    from prometheus_client import REGISTRY

    from monitoring.metrics import CameraSeries

    series = CameraSeries("w-clear", idle_s=math.inf)
    assert series.admit("L", "cam-clear") == ("L", "cam-clear")
    labels = {"line": "L", "camera": "cam-clear", "decision": "normal"}
    assert REGISTRY.get_sample_value("linewatch_frames_scored_total", labels) == 0
    assert series.clear() == [("L", "cam-clear")]
    assert REGISTRY.get_sample_value("linewatch_frames_scored_total", labels) is None
    assert len(series) == 0
