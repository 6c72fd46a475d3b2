"""Explanations: defect words from a CLIP text model on the flagged region, and an honest
"no text model" otherwise.

Not covered: whether the words are *right*. No CLIP weights are installable here, so the
text tower is the tiny random-weight ViT of tests/test_winclip.py: these tests check the
mechanism (vocabulary in, ranked words out, carried into alerts and review items), not the
quality of the naming, which needs the real ViT-B-16-plus-240 weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from consumers.routing import NO_TEXT_MODEL, route
from inference.calibration import Thresholds
from inference.clip import OpenCLIPBackbone
from inference.explain import DefectVocabulary, words_sentence
from inference.scoring import ScoreResult
from linewatch.wire import Alert, FrameMeta, FrameRef, ReviewItem, Topics


@pytest.fixture(scope="module")
def vocab() -> DefectVocabulary:
    return DefectVocabulary(OpenCLIPBackbone("lw-tiny-vit-64", random_init=True, seed=3),
                            ["scratch", "crack", "dent", "stain"], class_name="bottle")


def test_words_come_ranked_from_the_vocabulary(vocab: DefectVocabulary) -> None:
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    got = vocab.describe(crops, top=3)
    assert len(got) == 3
    for matches in got:
        assert [m.word for m in matches] and {m.word for m in matches} <= set(vocab.words)
        shares = [m.share for m in matches]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-6
    alone = vocab.describe(crops[:1], top=3)[0]  # the same alone as in a batch
    assert [m.word for m in alone] == [m.word for m in got[0]]
    assert [m.share for m in alone] == pytest.approx([m.share for m in got[0]], abs=1e-5)
    assert words_sentence(got[0]).startswith("looks most like: " + got[0][0].word)


def test_bad_vocabularies_are_refused() -> None:
    bb = OpenCLIPBackbone("lw-tiny-vit-64", random_init=True, seed=3)
    with pytest.raises(ValueError, match="two words"):
        DefectVocabulary(bb, ["scratch", " "])

    class NoText:
        pass

    with pytest.raises(ValueError, match="text encoder"):
        DefectVocabulary(NoText(), ["a", "b"])


def _route(describe):
    rgb = np.full((120, 160, 3), 90, np.uint8)
    amap = np.zeros((8, 8), np.float32)
    amap[2:4, 5:7] = 0.95
    th = Thresholds(alert=0.9, review=0.5, n_normals=100, guaranteed=True)
    meta = FrameMeta(camera="c", line="L", seq=1, capture_ns=1, encoding="jpeg", width=160, height=120)
    out = {}
    for score in (0.95, 0.6):
        _, outs = route(meta, FrameRef("t", 0, 1), rgb, ScoreResult(score, amap), th, Topics("t"),
                        "winclip", "w", 2, describe)
        out[score] = outs[1]
    return Alert.from_bytes(out[0.95].value), ReviewItem.from_bytes(out[0.6].value)


def test_alerts_and_review_items_carry_the_words_or_say_there_are_none(vocab) -> None:
    seen = []

    def describe(crop: np.ndarray) -> str:
        seen.append(crop.shape)
        return words_sentence(vocab.describe([crop])[0])

    alert, item = _route(describe)
    assert alert.words and alert.words.startswith("looks most like: ")
    assert "looks most like: " in item.explanation and NO_TEXT_MODEL not in item.explanation
    assert all(h < 120 and w < 160 for h, w, _ in seen)  # the region's crop, not the whole frame
    alert, item = _route(None)
    assert alert.words is None and NO_TEXT_MODEL in item.explanation
