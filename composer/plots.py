"""Routing plots (matplotlib, PNG), called through `RoutingTrace.plot_prompts` and `RoutingTrace.heatmap`.

Labels are never cut: long ones wrap. A batch's token rows are split by prompt (a rule between prompts, the
prompt's label beside its rows), and a tall batch is drawn at a bounded height instead of a strip of pixels.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

__all__ = ["prompt_grid", "token_heatmap"]

WRAP = 48            # characters per label line
MAX_HEIGHT = 14.0    # inches: a long batch is compressed, not a multi-thousand-pixel strip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(label: str) -> str:
    return "\n".join(textwrap.wrap(" ".join(str(label).split()), WRAP)) or " "


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def prompt_grid(path, shares: torch.Tensor, columns: list[str], labels: list[str], *, title: str) -> Path:
    """shares (P, C) in [0, 1]: one row per prompt (its label wrapped), one column per adapter."""
    plt = _pyplot()
    labels = [_wrap(label) for label in labels]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(2.0 + 0.45 * len(columns), 1.2 + 0.3 * max(lines, len(labels))))
    image = ax.imshow(shares.float().numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for index, value in enumerate(shares.flatten().tolist()):
        row, column = divmod(index, shares.shape[1])
        if value >= 0.05:
            ax.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _save(fig, path)


def token_heatmap(path, matrix: torch.Tensor, adapters: list[str], *, tokens: list[str] | None = None,
                  owner: torch.Tensor | None = None, labels: list[str] | None = None, title: str = "") -> Path:
    """matrix (tokens, N) routing weights. With owner (tokens,) and labels: rows split by prompt."""
    plt = _pyplot()
    rows = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * len(adapters), min(1.5 + 0.18 * rows, MAX_HEIGHT)))
    image = ax.imshow(matrix.float().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set_xticks(range(len(adapters)), adapters, rotation=45, ha="right")
    if owner is not None and labels is not None and len(labels) > 1:
        starts = [0] + [i for i in range(1, rows) if owner[i] != owner[i - 1]]
        ends = starts[1:] + [rows]
        for start in starts[1:]:
            ax.axhline(start - 0.5, color="white", linewidth=1.5)
        ax.set_yticks([(a + b - 1) / 2 for a, b in zip(starts, ends)],
                      [_wrap(labels[int(owner[a])]) for a in starts], fontsize=7)
        ax.set_ylabel("tokens of each prompt (prompt, then generated)")
    elif tokens is not None:
        if len(tokens) != rows:
            raise ValueError(f"{len(tokens)} token labels for {rows} rows")
        ax.set_yticks(range(rows), tokens, fontsize=7)
        ax.set_ylabel("token")
    else:
        ax.set_ylabel("token")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="routing weight")
    return _save(fig, path)
