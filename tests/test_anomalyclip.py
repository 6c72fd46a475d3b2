"""AnomalyCLIP's learned prompts (inference/anomalyclip.py), tested for mechanism on a tiny
random-weight CLIP (the bundled lw-tiny-vit-64 config): training lowers its loss, and the
learned prompts (the paper's design: contexts, deep text-layer prompts, DPAM) tell
pseudo-anomaly patches from normal ones better than WinCLIP's hand-written prompt ensemble
does on the same model; deep prompts replace the residual stream's context positions block by
block; DPAM's value-value path matches an independent computation while the stock path keeps
CLIP's image embedding; prompt files are safetensors with their design, and torch checkpoints
(AnomalyCLIP's released layout included) are read weights-only and checked against the model.

NOT covered here (no CLIP weights can be installed on this machine): AnomalyCLIP's quality on
real data with real weights, and a real released checkpoint (tested with checkpoints of the
released key names and shapes, made from the tiny model: the conversion is the boundary)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from inference.anomalyclip import (
    PromptDesign,
    PromptError,
    PromptLearner,
    _image_and_patches,
    convert_checkpoint,
    load_prompts,
    paper_design,
    prompt_separation,
    save_prompts,
    train_prompts,
)
from inference.clip import OpenCLIPBackbone

ARCH = "lw-tiny-vit-64"
OPENAI_LIKE = "lw-tiny-vit-64-quickgelu"


@pytest.fixture(scope="module")
def backbone() -> OpenCLIPBackbone:
    return OpenCLIPBackbone(ARCH, random_init=True)


@pytest.fixture(scope="module")
def openai_like() -> OpenCLIPBackbone:
    """The tiny model as OpenAI's CLIPs are built (QuickGELU), with three text blocks."""
    return OpenCLIPBackbone(OPENAI_LIKE, random_init=True)


def _pseudo(seed: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n normal conveyor frames and n local-augmentation pseudo-anomalies of them (calibrate's
    kind, made larger and stronger: at 64 px a patch is 8x8 pixels), with their masks."""
    from inference.pseudo import changed_mask, local_augment
    from producers.sources import SyntheticConveyor

    normals = SyntheticConveyor(seed=seed, size=(64, 64), defect_rate=0.0).normals(n)
    rng = np.random.default_rng(seed)
    fakes = [local_augment(im, rng, area=(0.06, 0.15), max_colour=0.5)[0] for im in normals]
    masks = [np.zeros((64, 64), bool)] * n
    masks += [changed_mask(im, f) for im, f in zip(normals, fakes, strict=True)]
    return list(normals) + fakes, masks


def _patch_labels(backbone: OpenCLIPBackbone, masks: list[np.ndarray]) -> torch.Tensor:
    gh, gw = backbone.grid
    return torch.from_numpy(np.stack([cv2.resize(m.astype(np.float32), (gw, gh),
                                                 interpolation=cv2.INTER_AREA) > 0.25 for m in masks]))


def test_learned_prompts_lower_the_loss_and_separate_pseudo_anomalies_better_than_the_ensemble(
        backbone: OpenCLIPBackbone) -> None:
    from inference.winclip import prompt_ensemble

    images, masks = _pseudo(seed=1, n=32)
    learner, report = train_prompts(backbone, images, masks, steps=60, lr=5e-3, batch_size=16)
    assert learner.design == paper_design(backbone)  # deep prompts and DPAM: both in play
    assert learner.design.deep_depth == 2 and learner.design.dpam_from == 1
    first, last = np.mean(report.losses[:10]), np.mean(report.losses[-10:])
    assert last < 0.85 * first, (first, last)
    held_images, held_masks = _pseudo(seed=2, n=32)  # other frames, other pseudo-anomalies
    _, patches = _image_and_patches(backbone, held_images, learner.design)
    labels = _patch_labels(backbone, held_masks)
    with torch.no_grad():
        learned = prompt_separation(backbone, learner(backbone), patches, labels)
    normal, anomalous = prompt_ensemble("object")
    ensemble = torch.stack([backbone.text_direction(normal), backbone.text_direction(anomalous)])
    handwritten = prompt_separation(backbone, ensemble, patches, labels)
    print(f"patch AUROC on held-out pseudo-anomalies: learned {learned:.3f}, ensemble {handwritten:.3f}")
    # a random CLIP's patch tokens carry little of this (a free linear probe on them reaches
    # ~0.6): the margin is small but the run is deterministic (seeded model, data and prompts)
    assert learned > handwritten + 0.02, (learned, handwritten)


def test_prompt_files_are_safetensors_and_checkpoints_are_read_weights_only(
        backbone: OpenCLIPBackbone, tmp_path) -> None:
    images, masks = _pseudo(seed=3, n=4)
    learner, _ = train_prompts(backbone, images, masks, steps=2, design=PromptDesign(n_ctx=4))
    path = tmp_path / "p.safetensors"
    save_prompts(learner, path, ARCH)
    with torch.no_grad():
        assert torch.allclose(load_prompts(backbone, path)(backbone), learner(backbone))
    width = backbone.model.token_embedding.weight.shape[1]
    # the released checkpoints' names and shapes: ctx_pos / ctx_neg with leading singletons
    ckpt = tmp_path / "contexts.pth"  # linewatch's own names: contexts only, CLIP's design
    torch.save({"normal_ctx": torch.randn(4, width), "abnormal_ctx": torch.randn(4, width)}, ckpt)
    out = tmp_path / "converted.safetensors"
    convert_checkpoint(ckpt, out, backbone)
    assert load_prompts(backbone, out).normal_ctx.shape == (4, width)
    assert load_prompts(backbone, out).design == PromptDesign(n_ctx=4)
    bare = tmp_path / "bare.pth"  # AnomalyCLIP's names without the buffers its code always saves
    torch.save({"ctx_pos": torch.randn(1, 1, 4, width), "ctx_neg": torch.randn(1, 1, 4, width)}, bare)
    with pytest.raises(PromptError, match="lacks"):
        convert_checkpoint(bare, tmp_path / "x.safetensors", backbone)
    evil = tmp_path / "evil.pth"
    torch.save({"ctx_pos": _Unpicklable()}, evil)  # a pickle with an object: never unpickled
    with pytest.raises(PromptError, match="weights-only"):
        convert_checkpoint(evil, tmp_path / "y.safetensors", backbone)
    wrong = tmp_path / "wrong.pth"
    torch.save({"normal_ctx": torch.randn(4, width + 1), "abnormal_ctx": torch.randn(4, width + 1)}, wrong)
    with pytest.raises(PromptError, match="do not fit"):
        convert_checkpoint(wrong, tmp_path / "z.safetensors", backbone)
    with pytest.raises(PromptError, match="not a safetensors file"):
        load_prompts(backbone, ckpt)
    elsewhere = tmp_path / "other-arch.safetensors"
    save_prompts(learner, elsewhere, "ViT-B-32")  # the same width could load, into the wrong space
    with pytest.raises(PromptError, match="learned for openclip:ViT-B-32"):
        load_prompts(backbone, elsewhere)
    with pytest.raises(PromptError, match="no room"):
        train_prompts(backbone, images, masks, steps=1, design=PromptDesign(n_ctx=75))


class _Unpicklable:
    """Stands for arbitrary code in a checkpoint."""


def test_deep_prompts_replace_the_context_positions_of_each_deeper_text_block(
        openai_like: OpenCLIPBackbone) -> None:
    """With both contexts equal, the first positions after each text block are the same in both
    prompts (the causal mask: they see only the start token and the context). Deep prompts
    equal to exactly the values the stream holds there must leave the text directions as they
    are without deep prompts, at depth 2 and 3 of a 3-block text tower (so a block past the
    depth is left alone); other values must change them."""
    bb = openai_like
    m = bb.model
    plain = PromptLearner(bb, PromptDesign(n_ctx=6), seed=1)
    with torch.no_grad():
        plain.abnormal_ctx.copy_(plain.normal_ctx)
        emb = m.token_embedding(plain.tokens).float()
        x = torch.cat([emb[:, :1], torch.stack([plain.normal_ctx, plain.abnormal_ctx]), emb[:, 7:]], dim=1)
        stream = [x + m.positional_embedding]
        for blk in m.transformer.resblocks:
            stream.append(blk(stream[-1], attn_mask=m.attn_mask))
        assert torch.allclose(stream[2][0, 1:4], stream[2][1, 1:4], atol=1e-6)
        want = plain(bb)
        for depth in (2, 3):
            learner = PromptLearner(bb, PromptDesign(n_ctx=6, deep_depth=depth, deep_length=3), seed=1)
            for p in (learner.normal_ctx, learner.abnormal_ctx):
                p.copy_(plain.normal_ctx)
            for i, deep in enumerate(learner.deep, start=1):  # the input of text block i + 1
                deep.copy_(stream[i][0, 1:4])
            assert torch.allclose(learner(bb), want, atol=1e-5), depth
            learner.deep[-1].add_(torch.randn(3, x.shape[-1], generator=torch.Generator().manual_seed(0)))
            assert not torch.allclose(learner(bb), want, atol=1e-3), depth


def _attend(blk: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (N, L, heads, d) tensors, through the block's out_proj."""
    s = (torch.einsum("nihd,njhd->nhij", q, k) / q.shape[-1] ** 0.5).softmax(dim=-1)
    out = torch.einsum("nhij,njhd->nihd", s, v)
    return blk.attn.out_proj(out.reshape(*out.shape[:2], -1))


def _dpam_by_hand(backbone: OpenCLIPBackbone, images: list[np.ndarray], start: int
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """AnomalyCLIP's dual path written out head by head: from block ``start`` on, the stock
    path (q-k attention and MLP) continues alone, and a second stream adds each block's
    value-value attention (no MLP) computed from the stock path's normed tokens. Returns the
    stock path's output tokens and each block's projected patch-stream tokens."""
    visual = backbone.model.visual
    with torch.no_grad():
        x = visual._embeds(backbone.preprocess(images))
        stock, outs = None, []
        for i, blk in enumerate(visual.transformer.resblocks, start=1):
            if i < start:
                x = blk(x)
            else:
                stock = x if stock is None else stock
                h = blk.ln_1(stock)
                c, heads = h.shape[-1], blk.attn.num_heads
                w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
                q, k, v = (torch.nn.functional.linear(h, w[j * c:(j + 1) * c], b[j * c:(j + 1) * c])
                           .view(*h.shape[:2], heads, c // heads) for j in range(3))
                x = x + _attend(blk, v, v, v)
                stock = stock + _attend(blk, q, k, v)
                stock = stock + blk.mlp(blk.ln_2(stock))
            outs.append(visual.ln_post(x) @ visual.proj)
        return (x if stock is None else stock), outs


def test_dpam_adds_a_value_value_path_and_leaves_clips_image_embedding_alone(
        backbone: OpenCLIPBackbone) -> None:
    images, _ = _pseudo(seed=5, n=3)
    stock_g, stock_p = _image_and_patches(backbone, images)
    visual = backbone.model.visual
    gh, gw = backbone.grid
    for start in (1, 2):  # DPAM in both blocks (the second one continues the dual path), or the last
        g, p = _image_and_patches(backbone, images, PromptDesign(dpam_from=start))
        assert torch.allclose(g, stock_g, atol=1e-5)  # the stock path goes on to the class token
        stock, outs = _dpam_by_hand(backbone, images, start)
        for layer, want in enumerate(outs):
            assert torch.allclose(p[:, layer], want[:, 1:].reshape(-1, gh, gw, want.shape[-1]), atol=1e-5)
        assert not torch.allclose(p[:, -1], stock_p[:, -1], atol=1e-3)
        g2, _ = _image_and_patches(backbone, images, PromptDesign(dpam_from=start, global_ln_post=False))
        assert torch.allclose(g2, stock[:, 0] @ visual.proj, atol=1e-5)  # AnomalyCLIP's: no ln_post
    assert torch.allclose(p[:, 0], stock_p[:, 0])  # with DPAM from block 2, block 1 is CLIP's


def _released(backbone: OpenCLIPBackbone, n_ctx: int = 4, length: int = 2, **changes: torch.Tensor | None
              ) -> dict:
    """A checkpoint in AnomalyCLIP's train.py layout, made for the tiny model: the names, shapes
    and half-precision buffers a released one holds (``changes`` replace or, as None, drop
    entries)."""
    learner = PromptLearner(backbone, PromptDesign(n_ctx=n_ctx))
    width = backbone.model.token_embedding.weight.shape[1]
    with torch.no_grad():
        emb = backbone.model.token_embedding(learner.tokens).float()
    gen = torch.Generator().manual_seed(3)
    sd = {"ctx_pos": torch.randn(1, 1, n_ctx, width, generator=gen),
          "ctx_neg": torch.randn(1, 1, n_ctx, width, generator=gen),
          "compound_prompts_text.0": torch.randn(length, width, generator=gen),
          "compound_prompt_projections.0.weight": torch.randn(896, width, generator=gen),
          "compound_prompt_projections.0.bias": torch.zeros(896)}
    for i, side in enumerate(("pos", "neg")):
        sd[f"token_prefix_{side}"] = emb[i, :1].reshape(1, 1, 1, width).half()
        sd[f"token_suffix_{side}"] = emb[i, 1 + n_ctx:].reshape(1, 1, -1, width).half()
        sd[f"tokenized_prompts_{side}"] = learner.tokens[i].reshape(1, 1, -1).int()
    sd.update(changes)
    return {"prompt_learner": {k: v for k, v in sd.items() if v is not None}}


def test_released_anomalyclip_checkpoints_convert_with_their_design_and_are_checked(
        openai_like: OpenCLIPBackbone, backbone: OpenCLIPBackbone, tmp_path) -> None:
    from inference.anomalyclip import AnomalyCLIPScorer

    ours, backbone = backbone, openai_like  # QuickGELU, as OpenAI's CLIP that AnomalyCLIP used

    ckpt, out = tmp_path / "epoch_15.pth", tmp_path / "released.safetensors"
    sd = _released(backbone)
    torch.save(sd, ckpt)
    learner = convert_checkpoint(ckpt, out, backbone)
    assert learner.design == PromptDesign(n_ctx=4, deep_depth=2, deep_length=2, dpam_from=1,
                                          global_ln_post=False)
    loaded = load_prompts(backbone, out)
    assert loaded.design == learner.design
    assert torch.equal(loaded.deep[0], sd["prompt_learner"]["compound_prompts_text.0"])
    assert torch.equal(loaded.abnormal_ctx, sd["prompt_learner"]["ctx_neg"][0, 0])
    with torch.no_grad():
        assert torch.allclose(loaded(backbone), learner(backbone))
    scorer = AnomalyCLIPScorer(backbone, loaded)
    scorer.fit([])
    images, _ = _pseudo(seed=6, n=2)
    results = scorer.score(images)
    assert results[0].anomaly_map.shape == backbone.grid and 0 <= results[0].score <= 1
    assert convert_checkpoint(ckpt, out, backbone, dpam_from=0).design.dpam_from == 0
    contexts = tmp_path / "contexts.pth"
    width = backbone.model.token_embedding.weight.shape[1]
    torch.save({"normal_ctx": torch.randn(4, width), "abnormal_ctx": torch.randn(4, width)}, contexts)
    assert convert_checkpoint(contexts, tmp_path / "c.safetensors", backbone,
                              dpam_from=0).design == PromptDesign(n_ctx=4)
    with pytest.raises(PromptError, match="learned without DPAM"):
        convert_checkpoint(contexts, tmp_path / "c.safetensors", backbone, dpam_from=1)

    def refused(match: str, **changes: torch.Tensor | None) -> None:
        bad = tmp_path / "bad.pth"
        torch.save(_released(backbone, **changes), bad)
        with pytest.raises(PromptError, match=match):
            convert_checkpoint(bad, tmp_path / "bad.safetensors", backbone)

    toks = _released(backbone)["prompt_learner"]["tokenized_prompts_neg"].clone()
    toks[..., 6] = 320  # another word after the context: not "damaged object."
    refused("prompt's tokens are not", tokenized_prompts_neg=toks)
    other = _released(backbone)["prompt_learner"]["token_suffix_pos"] + 0.5
    refused("learned on another CLIP", token_suffix_pos=other)
    refused("nothing else; found .'visual_deep_prompts'", visual_deep_prompts=torch.zeros(2, width))
    proj = {"compound_prompt_projections.1.weight": torch.zeros(896, width),
            "compound_prompt_projections.1.bias": torch.zeros(896)}
    deeper = {f"compound_prompts_text.{i}": torch.zeros(2, width) for i in (1, 2, 3)}
    refused("has 3", **deeper, **proj, **{k.replace(".1.", f".{i}."): v for i in (2, 3)
                                         for k, v in proj.items()})  # 5 text blocks deep
    refused("projections missing", **{"compound_prompts_text.1": torch.zeros(2, width)})
    refused("nothing else", **proj)  # a projection without its deep prompt: one was removed
    refused("lacks", token_prefix_neg=None)
    refused("expected 1 x", token_prefix_neg=torch.zeros(3))
    refused("expected .tokens, width.", **{"compound_prompts_text.0": torch.zeros(())})
    refused("one context per prompt", ctx_neg=torch.zeros(()))
    refused("ctx_pos is torch.int64, not a float", ctx_pos=torch.ones(1, 1, 4, width, dtype=torch.long))
    nan = _released(backbone)["prompt_learner"]["token_prefix_pos"].clone().fill_(float("nan"))
    refused("learned on another CLIP", token_prefix_pos=nan)
    refused("finite", ctx_neg=torch.full((1, 1, 4, width), float("inf")))
    two = tmp_path / "two.pth"  # other models saved beside the prompts: refused, not dropped
    torch.save({**_released(backbone), "model": {"w": torch.zeros(1)}}, two)
    with pytest.raises(PromptError, match="not only 'prompt_learner'"):
        convert_checkpoint(two, tmp_path / "two.safetensors", backbone)
    with pytest.raises(PromptError, match="use openclip:lw-tiny-vit-64-quickgelu"):
        convert_checkpoint(ckpt, tmp_path / "gelu.safetensors", ours)  # GELU: other features
    refused("not numbered", **{"compound_prompts_text.0": None,
                               "compound_prompts_text.1": torch.zeros(2, width), **proj})
    refused("one context per prompt", ctx_pos=torch.zeros(2, 1, 4, width))  # class-specific contexts
    tampered = tmp_path / "tampered.safetensors"  # a design that names deep prompts the file lacks
    from safetensors.torch import load_file, save_file
    for design, match in (({**vars(learner.design), "deep_depth": 1, "deep_length": 0}, "expected tensors"),
                          ({**vars(learner.design), "deep_depth": 10 ** 9}, "has 3"),
                          (list(vars(learner.design)), "unreadable"),
                          ({**vars(learner.design), "dpam_from": "1"}, "unreadable")):
        save_file(load_file(str(out)), str(tampered), metadata={
            "format": "linewatch-anomalyclip-2", "arch": OPENAI_LIKE, "design": json.dumps(design)})
        with pytest.raises(PromptError, match=match):
            load_prompts(backbone, tampered)


def test_anomalyclip_runs_at_another_resolution_with_interpolated_positions(backbone: OpenCLIPBackbone
                                                                            ) -> None:
    """As AnomalyCLIP runs OpenAI's 336 px ViT-L at 518: the patch grid's position embeddings
    are interpolated to the new grid, the class token's kept."""
    from inference.anomalyclip import AnomalyCLIPScorer
    from inference.clip import ClipUnavailable

    native = backbone.model.visual.positional_embedding
    same = OpenCLIPBackbone(ARCH, random_init=True, image_size=64)
    assert torch.allclose(same.model.visual.positional_embedding, native)  # same grid: unchanged
    big = OpenCLIPBackbone(ARCH, random_init=True, image_size=96)
    pos = big.model.visual.positional_embedding
    assert big.grid == (12, 12) and big.image_size == (96, 96) and pos.shape == (145, native.shape[1])
    assert torch.equal(pos[0], native[0])
    # bilinear: each new position lies between the old ones around it
    old, new = native[1:].reshape(8, 8, -1), pos[1:].reshape(12, 12, -1)
    assert bool((new.amax(dim=(0, 1)) <= old.amax(dim=(0, 1)) + 1e-6).all())
    assert torch.allclose(new.mean(dim=(0, 1)), old.mean(dim=(0, 1)), atol=0.02)
    scorer = AnomalyCLIPScorer(big, PromptLearner(big, paper_design(big)))
    scorer.fit([])
    images, _ = _pseudo(seed=7, n=2)
    assert scorer.score(images)[0].anomaly_map.shape == (12, 12)
    with pytest.raises(ClipUnavailable, match="give a multiple of 8"):
        OpenCLIPBackbone(ARCH, random_init=True, image_size=100)


def test_train_prompts_then_evaluate_anomalyclip_via_the_cli(tmp_path, capsys) -> None:
    """The commands end to end on a small MVTec-layout folder (pseudo-anomalies with masks)."""
    images, masks = _pseudo(seed=4, n=6)
    root = tmp_path / "part"
    for d in ("train/good", "test/good", "test/bad", "ground_truth/bad"):
        (root / d).mkdir(parents=True)
    for i, im in enumerate(images):
        bgr = cv2.cvtColor(im, cv2.COLOR_RGB2BGR)
        if i < 6:
            cv2.imwrite(str(root / "train/good" / f"{i}.png"), bgr)
            cv2.imwrite(str(root / "test/good" / f"{i}.png"), bgr)
        else:
            cv2.imwrite(str(root / "test/bad" / f"{i}.png"), bgr)
            cv2.imwrite(str(root / "ground_truth/bad" / f"{i}_mask.png"), masks[i].astype(np.uint8) * 255)

    from linewatch.cli import main

    prompts = tmp_path / "prompts.safetensors"
    rc = main(["train-prompts", "--data", str(root), "--backbone", f"openclip:{ARCH}", "--random-init",
               "--steps", "12", "--out", str(prompts), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0 and prompts.is_file(), out.err
    assert "12 images, 6 with defect masks" in out.err and "loss" in out.out
    tiny = ["--backbone", f"openclip:{ARCH}", "--random-init"]
    rc = main(["evaluate", "--data", str(root), "--method", "anomalyclip", *tiny, "--prompts", str(prompts),
               "--shots", "0", "--seeds", "1", "--no-progress"])
    assert rc == 0 and "image_auroc" in capsys.readouterr().out
    rc = main(["evaluate", "--data", str(root), "--method", "anomalyclip", *tiny, "--prompts", str(prompts),
               "--image-size", "96", "--shots", "0", "--seeds", "1", "--no-progress"])
    assert rc == 0 and "image_auroc" in capsys.readouterr().out
    rc = main(["evaluate", "--data", str(root), "--method", "anomalyclip", *tiny, "--shots", "0"])
    assert rc == 2 and "anomalyclip needs --prompts FILE" in capsys.readouterr().err
    rc = main(["evaluate", "--data", str(root), "--method", "anomalyclip", *tiny, "--prompts", str(prompts),
               "--shots", "1"])
    assert rc == 2 and "zero-shot and would ignore references" in capsys.readouterr().err
    rc = main(["train-prompts", "--backbone", "dinov2-s", "--out", str(prompts), "--data", str(root)])
    assert rc == 2 and "openclip:ARCH" in capsys.readouterr().err
    released = tmp_path / "epoch_15.pth"
    torch.save(_released(OpenCLIPBackbone(OPENAI_LIKE, random_init=True)), released)
    openai = ["--backbone", f"openclip:{OPENAI_LIKE}", "--random-init"]
    rc = main(["train-prompts", "--convert", str(released), *openai, "--dpam-from", "2",
               "--out", str(prompts)])
    assert rc == 0 and "deep_depth=2, deep_length=2, dpam_from=2" in capsys.readouterr().out
    rc = main(["evaluate", "--data", str(root), "--method", "anomalyclip", *openai, "--prompts", str(prompts),
               "--shots", "0", "--seeds", "1", "--no-progress"])
    assert rc == 0 and "image_auroc" in capsys.readouterr().out
    rc = main(["train-prompts", "--convert", str(released), *tiny, "--deep-depth", "2",
               "--out", str(prompts)])
    assert rc == 2 and "--deep-depth sets training" in capsys.readouterr().err
    rc = main(["train-prompts", "--data", str(root), *tiny, "--deep-depth", "1", "--deep-length", "2",
               "--out", str(prompts)])
    assert rc == 2 and "--deep-depth 1 has none" in capsys.readouterr().err
    rc = main(["train-prompts", "--data", str(root), *tiny, "--deep-depth", "3", "--out", str(prompts)])
    assert rc == 2 and "deep prompts in 3 text blocks" in capsys.readouterr().err
    nowhere = ["--data", str(tmp_path / "no-such-folder"), *tiny]  # these are refused before any data
    rc = main(["train-prompts", *nowhere, "--context", "74", "--out", str(prompts)])
    assert rc == 2 and "CLIP's 77-token window: at most 72" in capsys.readouterr().err
    rc = main(["train-prompts", "--convert", str(released), *openai, "--image-size", "96",
               "--out", str(prompts)])
    assert rc == 2 and "--image-size sets training" in capsys.readouterr().err
    rc = main(["train-prompts", *nowhere, "--dpam-from", "-3", "--out", str(prompts)])
    assert rc == 2 and "--dpam-from -3: an image block number" in capsys.readouterr().err
    rc = main(["train-prompts", *nowhere, "--out", str(tmp_path / "missing" / "p.safetensors")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
