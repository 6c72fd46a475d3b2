"""What the defect looks like, in words, when a CLIP text model is available.

The most anomalous region (an ROI box from the map) is cropped from the frame
and its CLIP image embedding compared with text prompts built from a defect
vocabulary ("a photo of a {class} with a scratch", ...). The best-matching words
come back with their softmax shares over the vocabulary. Without a text model
the caller says so; words are never invented from anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_VOCABULARY = ("scratch", "crack", "dent", "contamination", "missing part", "discolouration",
                      "hole", "stain", "deformation", "foreign object")
TEMPLATES = ("a photo of a {cls} with a {word}.", "a close-up photo of a {word} on a {cls}.",
             "a {cls} with a {word} defect.")


@dataclass(frozen=True)
class WordMatch:
    word: str
    share: float  # softmax share over the vocabulary, 0..1


class DefectVocabulary:
    """Scores crops against defect words with a CLIP backbone's text tower."""

    def __init__(self, backbone, words: Sequence[str] = DEFAULT_VOCABULARY, class_name: str = "object",
                 temperature: float = 0.01) -> None:
        if not hasattr(backbone, "text_direction"):
            raise ValueError("defect words need a CLIP backbone with a text encoder")
        words = [w.strip() for w in words if w.strip()]
        if len(words) < 2:
            raise ValueError("a defect vocabulary needs at least two words")
        self.backbone, self.words, self.temperature = backbone, list(words), temperature
        self.text = torch.stack([  # (W, E)
            backbone.text_direction([t.format(cls=class_name, word=w) for t in TEMPLATES])
            for w in self.words])

    def describe(self, crops: Sequence[np.ndarray], top: int = 3) -> list[list[WordMatch]]:
        """The ``top`` best words for each crop (RGB uint8), best first."""
        if not crops:
            return []
        with torch.no_grad():
            feats = self.backbone(self.backbone.preprocess(list(crops)))
            img = torch.nn.functional.normalize(feats.global_embedding.float(), dim=-1)
            shares = ((img @ self.text.to(img.device).T) / self.temperature).softmax(dim=-1).cpu().numpy()
        out = []
        for row in shares:
            order = np.argsort(-row)[:top]
            out.append([WordMatch(self.words[i], float(row[i])) for i in order])
        return out


def words_sentence(matches: Sequence[WordMatch]) -> str:
    """'looks most like: scratch (62%), crack (21%), dent (9%)'."""
    return "looks most like: " + ", ".join(f"{m.word} ({m.share:.0%})" for m in matches)
