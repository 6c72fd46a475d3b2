"""``linewatch evaluate`` on the real datasets in ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert "measured for --method patch-knn, not mutual" in capsys.readouterr().err


def _small_bottle(root, dst, train: int, test_good: int, broken: int, side: int = 256):
    """An MVTec-layout copy of the first photos of the bottle category at ``side`` px (a
    temporary folder: quick to read; the dataset itself stays where it is)."""
    for sub, n, masks in (("train/good", train, False), ("test/good", test_good, False),
                          ("test/broken_large", broken, True)):
        (dst / sub).mkdir(parents=True)
        for p in sorted((root / sub).glob("*.png"))[:n]:
            cv2.imwrite(str(dst / sub / p.name), cv2.resize(cv2.imread(str(p)), (side, side),
                                                           interpolation=cv2.INTER_AREA))
            if masks:
                m = root / "ground_truth" / "broken_large" / f"{p.stem}_mask.png"
                (dst / "ground_truth" / "broken_large").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(dst / "ground_truth" / "broken_large" / m.name),
                            cv2.resize(cv2.imread(str(m), cv2.IMREAD_GRAYSCALE), (side, side),
                                       interpolation=cv2.INTER_NEAREST))
    return dst


def test_few_shot_stream_protocol_scores_a_line_as_a_worker_does(tmp_path, capsys):
    """`evaluate --protocol stream --shots 1 [--stream-bank N]`: the normal photos with 5 %
    defects, less the draw's reference and calibration normals, in batches; with a bank,
    every frame scores at most what it scores without (the lower-of-two rule), most normals
    lower once the bank is warm, and the bank fills from what the worker admits. 70 bottle
    photos at 256 px and 112 px features keep it quick: a mechanism check, not the README's
    figures (those: `linewatch evaluate --protocol stream`, README few-shot quality)."""
    import numpy as np

    from inference.calibration import thresholds_from_normals
    from inference.settings import ScorerSettings
    from linewatch.cli import main
    from linewatch.evaluate import evaluate_fewshot_stream, fewshot_stream_frames, load_split
    from linewatch.images import read_rgb

    root = _small_bottle(shared_data("mvtec_ad", "bottle"), tmp_path / "bottle", 60, 10, 20)
    split = load_split(root)
    line = fewshot_stream_frames(split)
    assert sum(s.defect for s in line) == 4 and len(line) == 70 + 4  # 5 %: round(70 * 0.05 / 0.95)
    runs, admitted = {}, []
    for bank in (0, 8):
        bank_settings = {"stream_bank": bank, "warmup": 2} if bank else {}
        scorer = ScorerSettings(image_size=112, **bank_settings).build()
        if bank:  # the real admit(), watched: which frames a batch gave it
            admit = scorer.admit
            scorer.admit = lambda results, admit=admit: (admitted.append(list(results)), admit(results))
        runs[bank], kept = evaluate_fewshot_stream(scorer, split, 1, 0, calibration=3, progress=False)
    refs = set(runs[0].references)
    assert len(kept.test) == len(line) - 4 and not refs & {str(s.path) for s in kept.test}
    plain, banked = runs[0].scores, runs[8].scores
    assert np.all(banked <= plain + 1e-6)  # never above the references alone
    normal = np.array([not s.defect for s in kept.test])
    assert np.mean(banked[normal][16:] < plain[normal][16:] - 1e-4) > 0.8  # the bank lowers normals
    assert len(scorer.banks.frames("eval")) == 8  # full: the last 8 admitted frames
    # admitted after each batch of 8: the frames the references alone (the plain run) pass
    held = split.references(1 + 3, 0)[1:]
    alert = thresholds_from_normals([r.score for r in scorer.score([read_rgb(p) for p in held])]).alert
    passed = [int(np.sum(plain[i:i + 8] < alert)) for i in range(0, len(plain), 8)]
    assert [len(a) for a in admitted] == passed
    only_bank = (banked < alert) & (plain >= alert)  # frames the bank alone would have let in
    assert only_bank.any(), "the draw gives no frame that tells the two admission rules apart"

    out = tmp_path / "s.json"
    rc = main(["evaluate", "--no-progress", "--data", str(root), "--shots", "1", "--protocol", "stream",
               "--image-size", "112", "--seeds", "1", "--stream-bank", "8", "--warmup", "2",
               "--calibration", "3", "--json", str(out), "--plots", str(tmp_path / "plots")])
    r = capsys.readouterr()
    assert rc == 0, r.err
    res = json.loads(out.read_text())
    assert res["protocol"] == "stream" and res["stream_bank"] == 8 and res["calibration_normals"] == 3
    # pictures named for the bank, so a run with it does not overwrite the run without
    assert Path(res["plots"]["roc"]).name == "bottle_patch-knn_1shot_stream_bank8_roc.png", res["plots"]
    assert all(Path(p).is_file() for p in res["plots"].values())
    assert res["stream"].startswith("70 frames: 66 normal, 4 defective"), res["stream"]
    assert abs(res["image_auroc"] - runs[8].metrics["image_auroc"]) < 1e-9  # the CLI is this path
    assert "few-shot stream: 74 frames" in r.err and "camera bank 8" in r.err
    for bad, says in [(["--stream-bank", "8"], "add --protocol stream"),
                      (["--calibration", "10"], "add --protocol stream"),
                      (["--protocol", "stream", "--calibration", "1"], "at least 2"),
                      (["--protocol", "stream", "--method", "winclip+"], "not winclip+"),
                      (["--protocol", "stream", "--calibration", "60"], "has 60 normals to draw from"),
                      (["--protocol", "stream", "--expected-anomaly-rate", "0.1"], "--shots 0"),
                      (["--protocol", "stream", "--batch-size", "0"], "must be >= 1")]:
        assert main(["evaluate", "--data", str(root), "--shots", "1", *bad]) == 2
        assert says in capsys.readouterr().err, bad
