"""``linewatch evaluate`` on the real datasets in ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import pytest
from conftest import REPO, shared_data

from linewatch.evaluate import MT_TEST_NORMALS, DatasetError, load_split

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _evaluate(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch", "evaluate", "--no-progress",
                           "--torch-threads", "2", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_magnetic_tile_split_keeps_test_normals_out_of_the_references():
    root = shared_data("magnetic_tile")
    split = load_split(root)
    defects = [s for s in split.test if s.defect]
    normals = [s for s in split.test if not s.defect]
    assert len(defects) == 115 + 85 + 57 + 32 + 103
    assert len(normals) == MT_TEST_NORMALS
    assert all(s.mask is not None and s.mask.is_file() for s in defects)
    pool = set(split.candidates)
    assert pool.isdisjoint(s.path for s in normals)
    assert len(pool) + len(normals) == 952
    for seed in range(3):
        refs = split.references(4, seed)
        assert len(set(refs)) == 4 and pool.issuperset(refs)
    assert split.references(4, 0) != split.references(4, 1)
    assert load_split(root).test == split.test  # the test set does not depend on anything random


def test_defect_type_filter_and_bad_folders(tmp_path):
    root = shared_data("mvtec_ad", "bottle")
    small = load_split(root, ["broken_small"])
    assert {s.kind for s in small.test} == {"good", "broken_small"}
    assert sum(s.defect for s in small.test) == 22
    with pytest.raises(DatasetError, match="not in bottle"):
        load_split(root, ["scratch"])
    with pytest.raises(DatasetError, match="expected an MVTec AD category"):
        load_split(tmp_path)


def test_evaluate_cli_rejects_unknown_layout(tmp_path):
    r = _evaluate("--data", str(tmp_path))
    assert r.returncode == 2
    assert "expected an MVTec AD category" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_bottle_one_shot_meets_the_quality_bar(tmp_path):
    """The documented DINOv2-S configuration, mean over 3 reference draws, via the CLI."""
    root = shared_data("mvtec_ad", "bottle")
    out = tmp_path / "bottle.json"
    r = _evaluate("--data", str(root), "--method", "patch-knn", "--backbone", "dinov2-s",
                  "--image-size", "280", "--reference-augment", "rotate",
                  "--shots", "1", "--seeds", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_pro", "pixel_f1max",
                "n_images", "ms_per_image"):
        assert key in res
    assert res["n_images"] == 83 and len(res["per_seed"]) == 3
    assert len({tuple(s["references"]) for s in res["per_seed"]}) == 3
    print(f"bottle 1-shot: {res['image_auroc']:.4f} / {res['pixel_auroc']:.4f} / PRO {res['pixel_pro']:.4f}")
    assert res["image_auroc"] >= 0.995
    assert res["pixel_auroc"] >= 0.985
    assert res["pixel_pro"] >= 0.93
    for name in ("roc", "overlays"):
        img = cv2.imread(res["plots"][name])
        assert img is not None and min(img.shape[:2]) > 200, name
    assert "image_auroc" in r.stdout and "roc:" in r.stdout


def test_zero_shot_stream_protocol_via_the_cli(tmp_path, capsys):
    """`--method mutual --shots 0 --protocol stream`: the frames in a random order per seed,
    each against those before it; the stream is printed, the warm-up left out of the metrics.
    One defect type at 112 px keeps it quick: a mechanism check, not the README's figures."""
    root = shared_data("mvtec_ad", "bottle")
    from linewatch.cli import main

    out = tmp_path / "stream.json"
    rc = main(["evaluate", "--no-progress", "--data", str(root), "--method", "mutual", "--shots", "0",
               "--protocol", "stream", "--defect-types", "broken_large", "--image-size", "112",
               "--seeds", "2", "--json", str(out)])
    r = capsys.readouterr()
    assert rc == 0, r.err
    res = json.loads(out.read_text())
    assert res["stream"].startswith("40 frames: 20 normal, 20 defective") and res["warmup_frames"] == 8
    assert res["n_images"] == 32 and len(res["per_seed"]) == 2
    assert "zero-shot stream: 40 frames" in r.err and "after the first 8" in r.out
    assert res["image_auroc"] > 0.9, res["image_auroc"]  # broken_large is plain even at 112 px
    assert main(["evaluate", "--data", str(root), "--method", "patch-knn", "--shots", "0"]) == 2
    assert "--shots must be >= 1 for patch-knn" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(root), "--method", "mutual", "--shots", "1",
                 "--protocol", "stream"]) == 2
    assert "--method mutual --shots 0" in capsys.readouterr().err
