"""Markdown tables, as the README quotes the benchmarks, and the JSON files beside them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """``| a | b |`` lines: the header, its rule, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_rows(path: str | Path, rows: list[dict]) -> Path:
    """``{"rows": rows, "torch_threads": n}`` at ``path`` (folders made), for the README's tables."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "torch_threads": torch.get_num_threads()}, indent=2) + "\n")
    return path
