"""Head-layer figures: selected heads per layer, and the layer x head detection-score heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def heads_histogram(heads: list[tuple[int, int]], n_layers: int, path: Path, title: str) -> Path:
    counts = np.bincount([l for l, _ in heads], minlength=n_layers)
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(range(n_layers), counts, color="#3b6ea8")
    ax.set_xlabel("layer")
    ax.set_ylabel("selected heads")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.5, n_layers - 0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def score_heatmap(scores: np.ndarray, heads: list[tuple[int, int]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(scores.T, aspect="auto", origin="lower", cmap="viridis")
    if heads:
        ax.scatter([l for l, _ in heads], [h for _, h in heads], s=18, facecolors="none", edgecolors="red", linewidths=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
