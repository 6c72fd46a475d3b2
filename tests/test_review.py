"""The review queue against real things: the Tansu broker, `linewatch review` processes, the
store on a SQLite file and on a real PostgreSQL server (started by the tests), and the system
Chromium driving the real page (selenium + chromedriver from apt).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from linewatch.broker import EmbeddedBroker, free_port
from linewatch.review.store import ReviewError, ReviewStore
from linewatch.wire import FrameRef, Label, ReviewItem, Topics
from tests.conftest import LABEL_KEY, jpeg_declaring, wait_for

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"
OPERATORS = ("op", "ann", "lena", "op-a", "op-b", "Dana")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty review database: a SQLite file, or a new database on the test server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'r.db'}"
    import psycopg

    server = request.getfixturevalue("postgres_url")
    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


def make_item(seq: int, camera: str = "cam-r", score: float = 0.31) -> ReviewItem:
    """A review item built from a real conveyor frame and its heatmap overlay."""
    from inference.visualize import encode_jpeg, overlay
    from producers.sources import SyntheticConveyor

    rgb = SyntheticConveyor(seed=seq, size=(256, 256)).frame(seq, allow_defect=False).image
    amap = np.zeros(rgb.shape[:2], np.float32)
    amap[100:140, 60:120] = 1.0
    return ReviewItem(
        item_id=f"{camera}:{seq}", camera=camera, line="L", seq=seq, capture_ns=time.time_ns(),
        decided_ns=time.time_ns() + seq, score=score, alert_threshold=0.4, review_threshold=0.3,
        where="upper left, 2% of the frame", explanation="Score in the review band.",
        frame_jpeg_b64=base64.b64encode(encode_jpeg(rgb)).decode(),
        overlay_jpeg_b64=base64.b64encode(encode_jpeg(overlay(rgb, amap, 0, 1))).decode(),
        ref=FrameRef("t.frames", 0, seq))


# --- the store ---------------------------------------------------------------------------------
def test_intake_is_idempotent_and_claims_are_exclusive(store_url: str) -> None:
    store = ReviewStore(store_url, lease_s=60)
    for i in range(40):
        assert store.add(make_item(i)) is True
    assert store.add(make_item(3)) is False  # the same frame scored twice is one item
    claimed: dict[str, list[str]] = {"alice": [], "bob": [], "carol": []}

    def operator(name: str) -> None:
        s = ReviewStore(store.url, lease_s=60)  # its own engine, like another process would
        while (c := s.claim_next(name)) is not None:
            claimed[name].append(c.item_id)
            s.label(c.item_id, name, "normal")

    threads = [threading.Thread(target=operator, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for ids in claimed.values() for i in ids]
    assert len(every) == len(set(every)) == 40, claimed
    assert store.counts() == {"waiting": 0, "claimed": 0, "labelled": 40}


def test_leases_expire_and_only_the_holder_labels(store_url: str) -> None:
    store = ReviewStore(store_url, lease_s=0.3)
    store.add(make_item(1))
    a = store.claim_next("alice")
    assert a is not None and store.claim_next("bob") is None
    with pytest.raises(ReviewError) as e:
        store.label(a.item_id, "bob", "normal")
    assert e.value.status == 409
    # alice walked away: once her lease expires, bob may take the item
    b = wait_for(lambda: store.claim_next("bob"), 10, "alice's lease to expire", interval_s=0.05)
    assert b is not None and b.item_id == a.item_id
    with pytest.raises(ReviewError, match="not claimed by you"):
        store.label(a.item_id, "alice", "defect", "crack")
    store.label(b.item_id, "bob", "defect", "crack")
    (lab,) = store.unsent_labels()
    assert (lab.verdict, lab.defect_type, lab.operator) == ("defect", "crack", "bob")
    assert lab.frame_jpeg_b64 is None  # only normal verdicts carry the frame
    with pytest.raises(ReviewError):
        store.label(b.item_id, "bob", "defect", "not-a-type")


def test_64_bit_numbers_and_every_valid_camera_id_are_stored(store_url: str) -> None:
    """e170531: 32-bit seq/ns columns failed on PostgreSQL's first insert, and a camera id the
    wire contract accepts ("Line 1") was refused by the store: logged, committed, lost."""
    store = ReviewStore(store_url)
    item = dataclasses.replace(make_item(2**62, camera="Line 1"), capture_ns=1_796_000_000_000_000_000)
    assert store.add(item) is True
    got = store.item("Line 1:4611686018427387904")
    assert (got["seq"], got["capture_ns"], got["camera"]) == (2**62, 1_796_000_000_000_000_000, "Line 1")
    assert store.claim_next("ann").item_id == "Line 1:4611686018427387904"
    with pytest.raises(ReviewError):  # a picture that only declares its size is refused
        store.add(dataclasses.replace(make_item(5), overlay_jpeg_b64=base64.b64encode(
            jpeg_declaring(20000, 20000)).decode()))


def test_retention_prunes_old_items_and_expired_sessions(store_url: str) -> None:
    store = ReviewStore(store_url, lease_s=60)
    for i in range(4):
        store.add(make_item(i))
    c = store.claim_next("ann")
    store.label(c.item_id, "ann", "normal")
    store.add_operator("ann", PASSWORD)
    store.create_session("ann", ttl_s=0.0)  # expires at once
    live = store.create_session("ann", ttl_s=3600)

    def sessions() -> int:
        from sqlalchemy import func, select

        from linewatch.review.store import sessions as table

        with store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(table)).scalar_one()

    assert sessions() == 2
    assert store.prune(retention_s=3600) == {"labelled": 0, "unlabelled": 0}
    assert sessions() == 1 and store.session_operator(live) == "ann"  # only the expired one went
    assert store.prune(retention_s=0.0) == {"labelled": 0, "unlabelled": 3}  # label not sent yet
    store.mark_sent([c.item_id])
    assert store.prune(retention_s=0.0) == {"labelled": 1, "unlabelled": 0}
    assert store.counts() == {"waiting": 0, "claimed": 0, "labelled": 0}


def test_operators_sign_in_with_their_own_password(store_url: str) -> None:
    store = ReviewStore(store_url)
    store.add_operator("ann", PASSWORD)
    with pytest.raises(ReviewError, match="at least"):
        store.add_operator("bob", "short")
    with pytest.raises(ReviewError, match="operator name"):
        store.add_operator("bob<script>", PASSWORD)
    assert store.check_password("ann", PASSWORD)
    assert not store.check_password("ann", PASSWORD + "!") and not store.check_password("nobody", PASSWORD)
    token = store.create_session("ann", ttl_s=60)
    assert store.session_operator(token) == "ann"
    assert store.session_operator(token + "x") is None
    store.add_operator("ann", PASSWORD + " 2")  # a new password ends every session
    assert store.session_operator(token) is None
    token = store.create_session("ann", ttl_s=60)
    assert store.remove_operator("ann") and store.session_operator(token) is None
    assert store.operators() == []


# --- the service over HTTP ---------------------------------------------------------------------
class ReviewProc:
    def __init__(self, broker: EmbeddedBroker, topics: Topics, db: Path, workdir: Path,
                 port: int | None = None, lease_s: float = 60) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"review-{self.port}.log"
        self.ready = workdir / f"review-{self.port}-{uuid.uuid4().hex[:4]}.ready"
        store = ReviewStore(f"sqlite:///{db}")
        for name in OPERATORS:
            if name not in store.operators():
                store.add_operator(name, PASSWORD)
        self.tokens: dict[str, str] = {}
        cmd = [sys.executable, "-m", "linewatch", "review", "--bootstrap-servers", broker.bootstrap,
               "--topic-prefix", topics.prefix, "--port", str(self.port), "--db", f"sqlite:///{db}",
               "--lease-seconds", str(lease_s), "--metrics-port", "0", "--ready-file", str(self.ready)]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "LINEWATCH_LABEL_KEY": LABEL_KEY})
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})},
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def sign_in(self, operator: str, password: str = PASSWORD) -> tuple[int, dict]:
        status, body = self.request("POST", "/api/session", {"operator": operator, "password": password})
        return status, json.loads(body)

    def call(self, method: str, path: str, body: dict | None = None, operator: str | None = "op",
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A request as ``operator`` (signed in once, then by session token), or anonymous."""
        auth = {}
        if operator is not None:
            if operator not in self.tokens:
                status, got = self.sign_in(operator)
                assert status == 200, got
                self.tokens[operator] = got["token"]
            auth = {"Authorization": f"Bearer {self.tokens[operator]}"}
        return self.request(method, path, body, {**auth, **(headers or {})})

    def wait_items(self, n: int, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            counts = json.loads(self.call("GET", "/api/queue")[1])["counts"]
            if sum(counts.values()) >= n:
                return counts
            assert time.monotonic() < deadline, counts
            time.sleep(0.2)

    @property
    def metrics_url(self) -> str:
        import re

        return re.search(r"metrics on (http://\S+/metrics)", self.log.read_text()).group(1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def produce_items(broker: EmbeddedBroker, topics: Topics, items: list[ReviewItem]) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=8 << 20)
    for it in items:
        p.send(topics.review, key=it.camera.encode(), value=it.to_bytes())
    p.flush()
    p.close()


def read_labels(broker: EmbeddedBroker, topics: Topics, n: int, timeout_s: float = 30) -> list[Label]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topics.labels, bootstrap_servers=broker.bootstrap, group_id=None,
                      auto_offset_reset="earliest", consumer_timeout_ms=500)
    got: list[Label] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            for rec in c:
                got.append(Label.from_signed_bytes(rec.value, LABEL_KEY.encode()))
    finally:
        c.close()
    return got


def test_every_route_needs_a_session_and_ids_are_safe(broker: EmbeddedBroker, topics: Topics,
                                                      tmp_path: Path) -> None:
    svc = ReviewProc(broker, topics, tmp_path / "r.db", tmp_path)
    try:
        produce_items(broker, topics, [make_item(1)])
        svc.wait_items(1)
        for method, path in [("GET", "/"), ("GET", "/api/queue"), ("POST", "/api/claim"),
                             ("GET", "/api/items/cam-r:1"), ("GET", "/api/items/cam-r:1/frame.jpg"),
                             ("POST", "/api/items/cam-r:1/label"), ("POST", "/api/items/cam-r:1/skip"),
                             ("GET", "/-/healthy"), ("GET", "/docs"), ("GET", "/nothing-here")]:
            for auth in ({}, {"Authorization": "Bearer not-a-session-0000000000"},
                         {"Cookie": "lw_session=not-a-session-0000000000"}):
                status, _ = svc.request(method, path, {"verdict": "normal"}, auth)
                assert status == 401, (method, path, auth, status)
        assert svc.call("GET", "/api/items/cam-r:1/frame.jpg")[1][:2] == b"\xff\xd8"  # a JPEG
        for bad in ["..%2F..%2Fetc%2Fpasswd", "x'%20OR%20'1'%3D'1", "%3Cscript%3E", "a" * 300,
                    "cam-r:1%00"]:
            for path in (f"/api/items/{bad}", f"/api/items/{bad}/frame.jpg"):
                status, body = svc.call("GET", path)
                assert status == 404, (path, status, body[:200])
        assert svc.call("GET", "/api/items/cam-r:1/secret.jpg")[0] == 404
        assert svc.call("POST", "/api/items/cam-r:1/label", {"verdict": "normal"})[0] == 409  # unclaimed
    finally:
        svc.stop()


def test_sessions_are_server_side_operators_are_who_signed_in_and_guessing_is_slowed(
        broker: EmbeddedBroker, topics: Topics, tmp_path: Path) -> None:
    """e170531: the cookie held the master token (sign-out revoked nothing) and the operator was
    whatever an X-Operator header said."""
    svc = ReviewProc(broker, topics, tmp_path / "r.db", tmp_path)
    try:
        produce_items(broker, topics, [make_item(1)])
        svc.wait_items(1)
        item = json.loads(svc.call("POST", "/api/claim", operator="ann")[1])["item"]
        status, _ = svc.call("POST", f"/api/items/{item['item_id']}/label", {"verdict": "defect"},
                             operator="ann", headers={"X-Operator": "someone-else"})
        assert status == 200
        (lab,) = read_labels(broker, topics, 1)
        assert lab.operator == "ann"  # the header is ignored: identity comes from the session
        token = svc.tokens["ann"]
        assert svc.request("GET", "/api/queue", headers={"Authorization": f"Bearer {token}"})[0] == 200
        svc.request("POST", "/logout", headers={"Cookie": f"lw_session={token}"})  # (then 303 to /)
        assert svc.request("GET", "/api/queue", headers={"Authorization": f"Bearer {token}"})[0] == 401
        for _ in range(5):
            assert svc.sign_in("ann", "not the password")[0] == 401
        status, body = svc.sign_in("ann")  # even the right password waits now
        assert status == 429 and "try again" in body["error"]
        assert svc.sign_in("lena")[0] == 429  # and so does this client for other names
    finally:
        svc.stop()


def test_poison_review_records_are_skipped_and_what_follows_reaches_the_page(
        broker: EmbeddedBroker, topics: Topics, tmp_path: Path) -> None:
    """e170531: a review record with a missing field, a null, a string where a number belongs or a
    2**70 sequence number was retried every 2 s forever, and nothing behind it reached the page."""
    from kafka import KafkaProducer

    from tests.conftest import metric

    good = json.loads(make_item(1).to_bytes())

    def edit(**changes: object) -> bytes:
        d = dict(good)
        for k, v in changes.items():
            if v is ...:
                d.pop(k)
            else:
                d[k] = v
        return json.dumps(d).encode()

    poison = [edit(score=...), edit(camera=None), edit(seq="12"), edit(seq=2**70),
              edit(item_id="cam-r:2"), b"\x00 not json", edit(schema=9),
              edit(frame_jpeg_b64=base64.b64encode(jpeg_declaring(20000, 20000)).decode())]
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=8 << 20)
    for value in poison:
        p.send(topics.review, key=b"cam-r", value=value)
    p.send(topics.review, key=b"Line 1", value=make_item(7, camera="Line 1").to_bytes())
    p.flush()
    p.close()
    svc = ReviewProc(broker, topics, tmp_path / "r.db", tmp_path)
    try:
        svc.wait_items(1, timeout_s=30)
        waiting = json.loads(svc.call("GET", "/api/queue")[1])["waiting"]
        assert [w["item_id"] for w in waiting] == ["Line 1:7"]
        def rejected() -> float:
            return metric(svc.metrics_url, "linewatch_records_rejected_total", reader="review")

        wait_for(lambda: rejected() >= len(poison), 30, "the poison records counted")
        assert rejected() == len(poison)
        assert svc.proc.poll() is None
    finally:
        svc.stop()


def test_restart_loses_no_item_and_no_verdict(broker: EmbeddedBroker, topics: Topics,
                                              tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    svc = ReviewProc(broker, topics, db, tmp_path)
    produce_items(broker, topics, [make_item(i) for i in range(6)])
    svc.wait_items(6)
    decided = []
    for _ in range(3):
        item = json.loads(svc.call("POST", "/api/claim", operator="ann")[1])["item"]
        assert svc.call("POST", f"/api/items/{item['item_id']}/label", {"verdict": "normal"},
                        operator="ann")[0] == 200
        decided.append(item["item_id"])
    svc.stop(signal.SIGKILL)  # no goodbye: whatever was not sent must be sent after the restart
    produce_items(broker, topics, [make_item(i) for i in range(6, 9)])  # arrive while it is down
    svc = ReviewProc(broker, topics, db, tmp_path)
    try:
        counts = svc.wait_items(9)
        assert counts["labelled"] == 3 and counts["waiting"] + counts["claimed"] == 6
        labels = read_labels(broker, topics, 3)
        assert sorted({lab.item_id for lab in labels}) == sorted(decided)
        assert all(lab.verdict == "normal" and lab.frame_jpeg_b64 for lab in labels)
    finally:
        svc.stop()


def test_two_operators_at_once_never_get_the_same_item(broker: EmbeddedBroker, topics: Topics,
                                                       tmp_path: Path) -> None:
    svc = ReviewProc(broker, topics, tmp_path / "r.db", tmp_path)
    try:
        produce_items(broker, topics, [make_item(i) for i in range(30)])
        svc.wait_items(30)
        got: dict[str, list[str]] = {"op-a": [], "op-b": []}

        def work(name: str) -> None:
            while True:
                item = json.loads(svc.call("POST", "/api/claim", operator=name)[1])["item"]
                if item is None:
                    return
                got[name].append(item["item_id"])
                status, body = svc.call("POST", f"/api/items/{item['item_id']}/label",
                                        {"verdict": "defect", "defect_type": "scratch"}, operator=name)
                assert status == 200, body

        threads = [threading.Thread(target=work, args=(n,)) for n in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        both = got["op-a"] + got["op-b"]
        assert len(both) == len(set(both)) == 30 and got["op-a"] and got["op-b"]
    finally:
        svc.stop()


# --- the page, in a real browser -------------------------------------------------------------
@pytest.fixture
def chromium(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for exe in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(exe).exists(), f"{exe} missing: scripts/bootstrap installs chromium and chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    yield driver
    driver.quit()


def test_page_labels_an_item_with_the_keyboard_and_the_label_reaches_kafka(
        broker: EmbeddedBroker, topics: Topics, tmp_path: Path, chromium) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    svc = ReviewProc(broker, topics, tmp_path / "r.db", tmp_path)
    try:
        wait = WebDriverWait(chromium, 30)
        chromium.get(svc.url + "/")
        assert "Password" in chromium.page_source  # the 401 page is the sign-in form
        chromium.find_element(By.ID, "operator").send_keys("Dana")
        chromium.find_element(By.ID, "password").send_keys(PASSWORD)
        chromium.find_element(By.ID, "signin").click()
        wait.until(ec.visibility_of_element_located((By.ID, "empty")))  # nothing waiting yet
        produce_items(broker, topics, [make_item(11, score=0.312), make_item(12, score=0.335)])
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-item") == "cam-r:11")
        assert chromium.find_element(By.ID, "score").text == "0.312"
        assert chromium.find_element(By.ID, "camera").text == "cam-r"
        assert chromium.find_element(By.ID, "where").text == "upper left, 2% of the frame"
        assert chromium.execute_script("return document.getElementById('frame').naturalWidth") > 0
        assert chromium.execute_script("return document.getElementById('overlay').naturalWidth") > 0
        if os.environ.get("LINEWATCH_SCREENSHOT"):
            chromium.save_screenshot(os.environ["LINEWATCH_SCREENSHOT"])
        chromium.find_element(By.TAG_NAME, "body").send_keys("n")  # N = normal
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-item") == "cam-r:12")
        chromium.find_element(By.TAG_NAME, "body").send_keys("3")  # 3 = defect, third type (dent)
        wait.until(ec.visibility_of_element_located((By.ID, "empty")))
        labels = {lab.item_id: lab for lab in read_labels(broker, topics, 2)}
        assert labels["cam-r:11"].verdict == "normal" and labels["cam-r:11"].operator == "Dana"
        assert labels["cam-r:11"].frame_jpeg_b64  # workers can learn this frame
        assert (labels["cam-r:12"].verdict, labels["cam-r:12"].defect_type) == ("defect", "dent")
        assert chromium.find_element(By.ID, "n-labelled").text == "2"
    finally:
        svc.stop()


def test_the_demo_operators_verdicts_are_ones_the_store_takes(tmp_path: Path) -> None:
    """e.g. the synthetic feed's "stain" is not a page defect type: labelled as such, the store
    refused it and the demo's operator retried that held item forever."""
    from linewatch.demo_operator import verdict_body
    from producers.sources import DEFECT_KINDS

    store = ReviewStore(f"sqlite:///{tmp_path / 'r.db'}")
    answers = [("normal", None)] + [("defect", k) for k in DEFECT_KINDS]
    for seq, (verdict, kind) in enumerate(answers):
        store.add(make_item(seq))
        claim = store.claim_next("demo")
        assert claim is not None
        body = verdict_body(verdict, kind)
        store.label(claim.item_id, "demo", body["verdict"], body.get("defect_type"))
    assert store.counts().get("labelled") == len(answers)

