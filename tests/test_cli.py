"""The command line as a plant engineer meets it: help, errors, the demo, the broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from linewatch.broker import free_port


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _commands() -> list[str]:
    import argparse

    from linewatch.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("cmd", ["broker", "topics", "produce", "worker", "demo", "review"])
def test_every_subcommand_explains_itself(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0
    assert "usage: linewatch " + cmd in r.stdout
    assert len(r.stdout) > 400


@pytest.mark.parametrize("cmd", _commands())
def test_every_command_in_the_parser_renders_its_help(cmd, capsys):
    """Every command the parser has, not a list kept by hand: argparse formats help texts with
    %, so a bare percent sign in one (\"5%, printed\") crashed `linewatch evaluate --help`."""
    from linewatch.cli import main

    with pytest.raises(SystemExit) as done:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"usage: linewatch {cmd}" in out and len(out) > 200


def test_top_level_help_lists_commands_and_an_example():
    r = run("--help")
    assert r.returncode == 0
    for word in ("broker", "produce", "worker", "demo", "linewatch demo --frames"):
        assert word in r.stdout


def test_a_camera_id_outside_the_rule_is_refused_up_front():
    r = run("produce", "--bootstrap-servers", "127.0.0.1:1", "--source", "synthetic", "--camera", "cam:7")
    assert r.returncode == 2
    assert "--camera 'cam:7' is not a valid id" in r.stderr and "Traceback" not in r.stderr


def test_review_and_learning_need_the_label_key():
    import os

    env = {k: v for k, v in os.environ.items() if k != "LINEWATCH_LABEL_KEY"}
    r = subprocess.run([sys.executable, "-m", "linewatch", "review", "--bootstrap-servers", "127.0.0.1:1"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert r.returncode == 2 and "set LINEWATCH_LABEL_KEY" in r.stderr
    r = subprocess.run([sys.executable, "-m", "linewatch", "worker", "--bootstrap-servers", "127.0.0.1:1",
                        "--references", "x", "--learn-from-labels"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert r.returncode == 2 and "--learn-from-labels needs LINEWATCH_LABEL_KEY" in r.stderr


def test_worker_without_references_says_what_to_do():
    r = run("worker", "--bootstrap-servers", "127.0.0.1:1")
    assert r.returncode == 2
    assert "--references DIR is required" in r.stderr
    assert "Traceback" not in r.stderr


def test_worker_with_missing_reference_folder_names_it(tmp_path):
    r = run("worker", "--bootstrap-servers", "127.0.0.1:1", "--references", str(tmp_path / "nope"))
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr and "does not exist" in r.stderr


def test_produce_from_unknown_source_says_what_is_accepted():
    r = run("produce", "--bootstrap-servers", "127.0.0.1:1", "--source", "/no/such/thing")
    assert r.returncode == 2
    assert "not a folder, a video file, a camera index" in r.stderr


def test_broker_command_creates_topics_and_stops_on_sigterm():
    from kafka.admin import KafkaAdminClient

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "linewatch", "broker", "--port", str(port),
                             "--topic-prefix", "clitest"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        line = ""
        deadline = time.monotonic() + 30
        while "broker ready" not in line:
            assert time.monotonic() < deadline and proc.poll() is None
            line = proc.stdout.readline()
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        assert {"clitest.frames", "clitest.deadletter"} <= set(admin.list_topics())
        admin.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_demo_60_frames_loses_nothing(tmp_path):
    out = tmp_path / "out.json"
    r = run("demo", "--frames", "60", "--json", str(out), "--metrics-port", "0",
            "--workdir", str(tmp_path / "w"), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    for key in ("frames_produced", "frames_scored", "frames_lost", "duplicates", "alerts",
                "review_items", "dead_letters", "frames_per_second", "latency_ms", "precision",
                "recall"):
        assert key in s
    assert s["frames_produced"] == 60
    assert s["frames_lost"] == 0
    assert s["frames_scored"] + s["dead_letters"] == 60
    assert s["alerts_or_reviews_missing"] == 0, s  # every alert and review item read, not only scores
    assert s["latency_ms"]["p50"] > 0 and s["latency_ms"]["p99"] >= s["latency_ms"]["p50"]
    assert s["defects_in_feed"] > 0 and s["recall"] is not None
    assert "frames_lost" in r.stdout  # the summary table
    # the simulated operator (on by default) answered the review page through its API
    assert s["review_items"] > 0 and sum(s["operator_verdicts"].values()) >= 1, s
    assert "normal" in s["by_kind"] and "first third: alert / flagged" in r.stdout
    # where the worker's time went, read from its step counters
    assert s["worker_ms_per_frame"]["score"] > 0 and s["worker_frames_per_second"] > 0, s
    assert "where the worker's time went" in r.stdout


def test_demo_two_workers_share_the_cameras_and_the_cameras_wait_for_them(tmp_path):
    """--workers 2 --cameras 4: two members of one consumer group, and both score frames (a
    camera's frames are keyed to one partition); nothing lost. Unpaced cameras (--fps 0) wait
    for decisions, so no more than --max-lag + 1 of their frames are ever undecided (without
    the wait they would run far ahead of two CPU workers)."""
    out, work = tmp_path / "out.json", tmp_path / "w"
    r = run("demo", "--frames", "40", "--cameras", "4", "--workers", "2", "--fps", "0",
            "--max-lag", "3", "--no-operator", "--json", str(out), "--metrics-port", "0",
            "--workdir", str(work), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["frames_lost"] == 0 and s["frames_scored"] + s["dead_letters"] == 40
    assert s["max_lag_frames"] <= 4, s["max_lag_frames"]
    by_worker = s["frames_by_worker"]  # from each score's worker field
    assert set(by_worker) == {"demo-worker", "demo-worker-2"} and all(by_worker.values()), by_worker
    assert "where the 2 workers' time went" in r.stdout


def test_demo_refuses_more_workers_than_partitions_or_cameras():
    r = run("demo", "--workers", "5", "--cameras", "5", timeout=60)
    assert r.returncode == 2 and "--workers 5: give 1 to 4" in r.stderr, r.stderr
    r = run("demo", "--workers", "2", timeout=60)
    assert r.returncode == 2 and "give --cameras 2 or more" in r.stderr, r.stderr
