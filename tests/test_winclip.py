"""WinCLIP / WinCLIP+ correctness on a small randomly initialised open_clip ViT.

No CLIP weights can be installed here, so these tests check the *computation*
(window embeddings, harmonic aggregation, batching, the cascade) on a tiny
architecture shipped in ``inference/model_configs``. Not covered: the quality
of WinCLIP with real pretrained CLIP weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import inference
from inference.clip import ClipUnavailable, OpenCLIPBackbone, window_index
from inference.winclip import WinCLIPScorer, harmonic_aggregation, harmonic_fusion, prompt_ensemble

ARCH = "lw-tiny-vit-64"


@pytest.fixture(scope="module")
def backbone() -> OpenCLIPBackbone:
    return OpenCLIPBackbone(ARCH, random_init=True, seed=3)


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (rng.integers(50, 90), rng.integers(50, 90), 3), dtype=np.uint8)
            for _ in range(n)]


def _independent_window_embedding(bb: OpenCLIPBackbone, image: torch.Tensor,
                                  cells: list[int]) -> torch.Tensor:
    """Encode one window the slow, obvious way: its own short sequence, block by block."""
    v = bb.model.visual
    with torch.no_grad():
        patches = v.conv1(image[None]).flatten(2)[0].T  # (N, C)
        pos = v.positional_embedding
        seq = [v.class_embedding + pos[0]] + [patches[c] + pos[1 + c] for c in cells]
        x = v.ln_pre(torch.stack(seq)[None])
        for block in v.transformer.resblocks:
            x = block(x)
        return v.ln_post(x[0, 0]) @ v.proj


@pytest.mark.parametrize("k", [2, 3])
def test_each_window_embedding_equals_an_independent_encoding(backbone, k):
    x = backbone.preprocess(_frames(2, seed=k))
    fast = backbone(x, window_sizes=(k,)).windows[k]
    idx = window_index(backbone.grid, k)
    assert fast.shape[:2] == (2, idx.shape[0])
    for b in range(2):
        for w in range(0, idx.shape[0], 5):
            ref = _independent_window_embedding(backbone, x[b], idx[w].tolist())
            torch.testing.assert_close(fast[b, w], ref, atol=1e-5, rtol=0)


def test_windows_do_not_see_outside_tokens(backbone):
    """Changing pixels outside a window must leave that window's embedding untouched."""
    frame = _frames(1, seed=7)[0]
    x = backbone.preprocess([frame])
    y = x.clone()
    y[:, :, 32:, :] = 0.0  # patch size 8: rows 4.. of the 8x8 grid change
    a = backbone(x, window_sizes=(2,)).windows[2]
    b = backbone(y, window_sizes=(2,)).windows[2]
    top = [i for i, cells in enumerate(window_index(backbone.grid, 2).tolist()) if max(cells) < 3 * 8]
    bottom = [i for i, cells in enumerate(window_index(backbone.grid, 2).tolist()) if min(cells) >= 4 * 8]
    torch.testing.assert_close(a[0, top], b[0, top], atol=1e-6, rtol=0)
    assert (a[0, bottom] - b[0, bottom]).abs().max() > 1e-3


def test_harmonic_aggregation_matches_the_formula_by_hand():
    # 3x3 grid, 2x2 windows: four windows with top-left (0,0), (0,1), (1,0), (1,1)
    idx = window_index((3, 3), 2)
    assert idx.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    s = torch.tensor([[0.2, 0.4, 0.5, 0.8]], dtype=torch.float64)
    got = harmonic_aggregation(s, idx, 9)[0]
    expected = [
        0.2,                              # corner: only window 0
        2 / (1 / 0.2 + 1 / 0.4),          # top edge: windows 0, 1
        0.4,
        2 / (1 / 0.2 + 1 / 0.5),
        4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 0.8),  # centre: all four
        2 / (1 / 0.4 + 1 / 0.8),
        0.5,
        2 / (1 / 0.5 + 1 / 0.8),
        0.8,
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    fused = harmonic_fusion([torch.tensor([0.5, 0.1]), torch.tensor([0.25, 0.1])])
    torch.testing.assert_close(fused, torch.tensor([1 / 3, 0.1]))


def test_prompt_ensemble_is_states_times_templates():
    normal, anomalous = prompt_ensemble("bottle")
    assert len(normal) == 7 * 22 and len(anomalous) == 4 * 22
    assert "a photo of a flawless bottle for visual inspection." in normal
    assert "a cropped photo of the bottle with defect." in anomalous


@pytest.mark.parametrize("few_shot", [False, True])
def test_frame_alone_equals_frame_in_batch(backbone, few_shot):
    scorer = WinCLIPScorer(backbone, class_name="part", few_shot=few_shot)
    scorer.fit(_frames(2, seed=11))
    frames = _frames(5, seed=12)
    batch = scorer.score(frames)
    for f, r in zip(frames, batch, strict=True):
        alone = scorer.score([f])[0]
        assert abs(alone.score - r.score) < 1e-5
        np.testing.assert_allclose(alone.anomaly_map, r.anomaly_map, atol=1e-5)
        assert r.anomaly_map.shape == backbone.grid


def test_winclip_plus_memory_makes_a_reference_normal(backbone):
    scorer = WinCLIPScorer(backbone, few_shot=True)
    refs = _frames(2, seed=21)
    scorer.fit(refs[:1])
    size = scorer.memory_size
    before = scorer.score([refs[1]])[0]
    scorer.add_normals(refs[1:])
    after = scorer.score([refs[1]])[0]
    assert scorer.memory_size == 2 * size
    # its own patches and windows are now in memory: the few-shot half of the map is zero
    zs_only = WinCLIPScorer(backbone, few_shot=False)
    zs_only.fit([])
    zs_map = zs_only.score([refs[1]])[0].anomaly_map
    np.testing.assert_allclose(after.anomaly_map, zs_map / 2, atol=1e-5)
    assert after.score < before.score


def test_cascade_gives_identical_decisions_and_skips_maps(backbone):
    scorer = WinCLIPScorer(backbone, few_shot=True)
    scorer.fit(_frames(2, seed=31))
    frames = _frames(12, seed=32)
    full = scorer.score(frames)
    gate = float(np.median([r.score for r in full]))
    scorer.map_gate = gate
    lazy = scorer.score(frames)
    assert [r.score for r in lazy] == pytest.approx([r.score for r in full], abs=1e-6)
    for f, z in zip(full, lazy, strict=True):
        assert z.full_map == (z.score >= gate)
        if z.full_map:
            np.testing.assert_allclose(z.anomaly_map, f.anomaly_map, atol=1e-6)
    assert 0 < sum(z.full_map for z in lazy) < len(frames)


def test_paper_image_score_refuses_the_cascade(backbone):
    scorer = WinCLIPScorer(backbone, few_shot=True, image_score="paper")
    scorer.fit(_frames(1))
    scorer.map_gate = 0.5
    with pytest.raises(ValueError, match="map_gate"):
        scorer.score(_frames(1))


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ClipUnavailable, match="--weights PATH"):
        inference.create_scorer("winclip", backbone="openclip:ViT-B-16-plus-240")
    with pytest.raises(ClipUnavailable, match="does not exist"):
        inference.create_scorer("winclip", backbone="openclip:ViT-B-16-plus-240",
                                weights=str(tmp_path / "nope.bin"))
    with pytest.raises(ValueError, match="needs a CLIP backbone"):
        inference.create_scorer("winclip", backbone="dinov2-s")


def test_unloadable_weights_are_a_clear_error_not_advice_to_unpickle(tmp_path, backbone, capsys):
    """A CLIP weights file that is not a weights-only state dict of the architecture (garbage,
    a TorchScript archive as OpenAI ships, another model's weights) is a ClipUnavailable naming
    the file, and a CLI error (rc 2): it was a traceback whose advice was to load it with
    weights_only=False, running whatever code the file holds."""
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint" * 8)
    script = tmp_path / "openai.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, other)
    for path in (garbage, script, other):
        with pytest.raises(ClipUnavailable, match=f"CLIP weights file {path} cannot be loaded"):
            OpenCLIPBackbone(ARCH, str(path))
    from conftest import shared_data

    from linewatch.cli import main

    rc = main(["evaluate", "--data", str(shared_data("mvtec_ad", "bottle")), "--method", "winclip",
               "--backbone", f"openclip:{ARCH}", "--weights", str(garbage), "--shots", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be loaded into openclip:lw-tiny-vit-64" in err, err
    assert "weights_only=False" not in err


def test_weights_load_from_a_local_file(tmp_path, backbone):
    """The offline path production uses: a checkpoint file on disk, no hub."""
    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    loaded = OpenCLIPBackbone(ARCH, str(path))
    x = backbone.preprocess(_frames(1))
    torch.testing.assert_close(loaded(x).global_embedding, backbone(x).global_embedding)


def _agreement_with_fp32(fp32: OpenCLIPBackbone, other: OpenCLIPBackbone, frames: list[np.ndarray]):
    """WinCLIP+ on the same frames and references with both backbones -> (scores, maps) pairs."""
    out = []
    for bb in (fp32, other):
        scorer = WinCLIPScorer(bb, class_name="part", few_shot=True)
        scorer.fit(_frames(2, seed=41))
        res = scorer.score(frames)
        out.append((np.array([r.score for r in res]), np.stack([r.anomaly_map for r in res])))
    (s32, m32), (s, m) = out
    assert np.corrcoef(s32, s)[0, 1] > 0.99, (s32, s)
    assert np.corrcoef(m32.ravel(), m.ravel())[0, 1] > 0.99
    assert np.argsort(s32)[-3:].tolist() == np.argsort(s)[-3:].tolist()  # same frames on top
    assert np.isfinite(m).all()
    return s32, s


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_agrees_with_fp32(backbone, tmp_path, precision):
    """The GPU setting, run here on CPU: same weights in bf16/fp16 give the same picture.

    Not covered: speed (half precision only pays on a GPU) and real CLIP weights,
    whose larger activations are the usual trouble for fp16.
    """
    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    half = OpenCLIPBackbone(ARCH, str(path), precision=precision)
    assert next(half.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    _agreement_with_fp32(backbone, half, _frames(12, seed=42))


def test_int8_agrees_with_fp32_and_keeps_the_window_structure(backbone, tmp_path):
    """The CPU setting: int8 image tower vs fp32 on the same weights.

    int8 is not exact, so this checks agreement (scores, maps, the frames on top),
    that a frame's result does not depend on its batch, and that the int8 window path
    is still a window path: pixels outside a window barely move its embedding.
    Real-weight quality is checked on DINOv2 in tests/test_scoring.py; real CLIP
    weights are not covered.
    """
    from inference.int8 import Int8ClipBlock

    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    q = OpenCLIPBackbone(ARCH, str(path), precision="int8")
    assert all(isinstance(b, Int8ClipBlock) for b in q.model.visual.transformer.resblocks)
    frames = _frames(12, seed=42)
    s32, s8 = _agreement_with_fp32(backbone, q, frames)
    assert not np.allclose(s32, s8, atol=1e-6)  # really a different computation
    # A frame's result must not depend on its batch (int8 sets activation scales per call).
    alone = q(q.preprocess(frames[3:4]), window_sizes=(2, 3))
    batch = q(q.preprocess(frames[:6]), window_sizes=(2, 3))
    torch.testing.assert_close(alone.global_embedding[0], batch.global_embedding[3], atol=1e-5, rtol=0)
    for k in (2, 3):
        torch.testing.assert_close(alone.windows[k][0], batch.windows[k][3], atol=1e-5, rtol=0)
    # Still a window path: pixels outside a window reach it only through the per-frame
    # activation scale, far less than pixels inside it do.
    x = q.preprocess(_frames(1, seed=7))
    y = x.clone()
    y[:, :, 32:, :] = 0.0  # rows 4.. of the 8x8 grid
    a, b = q(x, window_sizes=(2,)).windows[2][0], q(y, window_sizes=(2,)).windows[2][0]
    cells = window_index(q.grid, 2).tolist()
    top = [i for i, c in enumerate(cells) if max(c) < 3 * 8]
    bottom = [i for i, c in enumerate(cells) if min(c) >= 4 * 8]
    assert (a[top] - b[top]).abs().max() < 0.1 * (a[bottom] - b[bottom]).abs().max()


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision"):
        OpenCLIPBackbone(ARCH, random_init=True, precision="int4")
    with pytest.raises(ValueError, match="openclip"):
        inference.create_scorer("patch-knn", precision="bf16")
    with pytest.raises(ValueError, match="CPU only"):  # checked before anything touches the GPU
        inference.create_scorer("winclip", random_init=True, device="cuda:0", precision="int8")
    with pytest.raises(ValueError, match="efficientnet-lite0 runs in fp32"):
        inference.create_scorer("patch-knn", backbone="efficientnet-lite0", precision="int8")
