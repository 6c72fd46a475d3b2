"""The benchmark commands run end to end (not how fast: speed is measured by running them).

The WinCLIP benchmark's GPU form (``--no-peer --device cuda --precision bf16
--decode``) cannot run here; this runs the same code path on CPU with the tiny
random-weight architecture, so the command a GPU machine needs is known to work
up to the device. Not covered: CUDA itself, and the anomalib peer (its venv is
benchmark-only and is not installed by CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_winclip_benchmark_gpu_form_runs_on_cpu(tmp_path):
    out = tmp_path / "winclip.json"
    cmd = [sys.executable, "-m", "benchmarks.winclip", "--arch", "lw-tiny-vit-64", "--no-peer",
           "--precision", "bf16", "--decode", "--frames", "8", "--stream", "40", "--repeats", "2",
           "--json", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cascade 1-shot" in r.stdout and "JPEG decode timed" in r.stdout
    res = json.loads(out.read_text())
    assert res["precision"] == "bf16" and res["decode_timed"] is True and res["arch"] == "lw-tiny-vit-64"
    for run in ("zero-shot", "1-shot"):
        assert len(res["runs"][run]["linewatch_fps_runs"]) == 2
        assert res["runs"][run]["linewatch_fps"] > 0
    cascade = res["runs"]["cascade 1-shot, 5% to review"]
    assert cascade["identical_decisions"] is True
    assert 0 < cascade["full_maps_fraction"] <= 0.1


def test_winclip_benchmark_refuses_unlike_comparisons(tmp_path):
    for extra, why in ((["--precision", "bf16"], "measured without the anomalib peer"),
                       (["--arch", "lw-tiny-vit-64"], "is built on ViT-B-16-plus-240 only")):
        r = subprocess.run([sys.executable, "-m", "benchmarks.winclip", *extra, "--json",
                            str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert why in r.stderr and "--no-peer" in r.stderr


def test_pipeline_benchmark_splits_the_workers_time_by_step(tmp_path):
    """``python -m benchmarks.pipeline`` end to end on a few frames: both workers' step splits,
    the overhead total and the model timed alone come out (the figures are the README's)."""
    out = tmp_path / "pipeline.json"
    cmd = [sys.executable, "-m", "benchmarks.pipeline", "--frames", "16", "--paced-frames", "8",
           "--paced-fps", "8", "--json", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    real, noop = res["rows"]
    for row in (real, noop):
        steps = row["step_ms_per_frame"]
        assert {"poll", "decode", "score", "route", "drift", "deliver", "commit"} <= set(steps)
        assert steps["decode"] > 0 and steps["deliver"] > 0 and steps["commit"] > 0
        assert steps["drift"] > 0  # drift runs in both (--holdout), as in a real worker
        assert row["paced_busy_frames_per_second"] > 0
    shares = res["overhead_share_of_model_time"]
    assert abs(shares["total"] - sum(v for k, v in shares.items() if k != "total")) < 1e-3
    assert res["model_alone_ms_per_frame"] > 0 and res["device"] == "cpu"
    assert "pipeline overhead, all steps but the model" in r.stdout
    # --device runs the real scorer's worker on a GPU (README, measured on the device machine;
    # CI has none); int8 is the CPU workers' precision, so the two together are refused
    bad = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--int8", "--device", "cuda"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--int8 is the CPU workers' precision" in bad.stderr


def test_fewshot_technique_benchmark_runs_end_to_end(tmp_path):
    """``python -m benchmarks.fewshot --quick`` (bottle, 224 px, 12 frames): the technique
    table's code path, the first rows of it, in the JSON shape the README's table comes from."""
    from tests.conftest import shared_data

    shared_data("mvtec_ad", "bottle")  # skips where ../shared/data is absent
    out = tmp_path / "fewshot.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.fewshot", "--quick", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [x["technique"] for x in rows][:2] == ["baseline (worker before issue 17)", "rotate 90 (4 views)"]
    for row in rows:
        assert row["dataset"] == "bottle" and row["image_size"] == 224 and row["seeds"] == [0]
        assert all(0.0 <= row[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pixel_pro"))
        assert row["ms_per_frame"] >= row["backbone_ms"] > 0
    assert "| bottle 1-shot | baseline" in r.stdout


def test_presets_benchmark_times_the_scorer_it_names(tmp_path):
    """``python -m benchmarks.presets`` (the README's CPU and GPU table; the GPU figures come from
    the device machine, ``--device cuda``, which CI does not have): one setting, one frame a
    dataset, in the JSON shape the table comes from; an unknown setting is refused by name."""
    from tests.conftest import shared_data

    shared_data("magnetic_tile")  # skips where ../shared/data is absent
    out = tmp_path / "presets.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.presets", "--frames", "1", "--repeats", "1",
                        "--batch-sizes", "1,2", "--settings", "defaults (224 px)", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["setting"], x["dataset"]) for x in rows] == [("defaults (224 px)", "bottle"),
                                                           ("defaults (224 px)", "magnetic_tile")]
    assert all(set(x["ms_per_frame"]) == {"1", "2"} and min(x["ms_per_frame"].values()) > 0 for x in rows)
    for args, says in ((["--settings", "fast"], "unknown 'fast'"),
                       (["--check"], "give --device"),  # the CPU against itself
                       (["--parity"], "give --device"),
                       (["--parity", "--device", "cuda", "--repeats", "2"], "--parity times nothing")):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.presets", *args],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and says in bad.stderr, (args, bad.stderr[-500:])


def test_stream_bank_benchmark_runs_the_shipped_path_end_to_end(tmp_path):
    """``python -m benchmarks.stream_bank`` on bottle, one draw, no bank and a bank every frame
    enters: the README table's code path and JSON shape. Every frame enters the bank under
    ``all`` and none under ``none``; quality is what the full run measures, not this."""
    from tests.conftest import shared_data

    shared_data("mvtec_ad", "bottle")  # skips where ../shared/data is absent
    out = tmp_path / "stream_bank.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.stream_bank", "--datasets", "bottle",
                        "--seeds", "1", "--policies", "none,all", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    none, every = json.loads(out.read_text())["rows"]
    assert (none["policy"], none["bank"], none["admitted"]) == ("none", 0, 0)
    got = (every["policy"], every["bank"], every["admitted"], every["admitted_defects"])
    assert got == ("all", 32, 83, 63)
    for row in (none, every):
        assert all(0.0 <= row[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pixel_pro"))
    assert "| bottle 1-shot | all (min) | 32 |" in r.stdout
