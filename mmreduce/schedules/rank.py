"""Are vision-token rankings similar across layers? (the observation behind G-Search)

For each calibration sample, the vision tokens are ranked at every layer by the attention of the last prompt token
(recomputed from the layer's own q/k, mean over heads, unreduced model); the Kendall τ between every pair of layers
is averaged over samples.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.stats import kendalltau

from mmreduce.adapters import get_adapter

__all__ = ["attention_rankings", "kendall_matrix", "plot_kendall", "rank_analysis"]


@torch.inference_mode()
def attention_rankings(model, batch: dict) -> list[np.ndarray]:
    """Per sample, an (L, N) array of attention scores of its N vision tokens at each of the L layers."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers()
    inputs: dict[int, tuple] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: inputs.__setitem__(i, (args[0] if args else kwargs["hidden_states"],
                                                                    kwargs["position_embeddings"])),
            with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        model(**batch, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    mask = batch.get("attention_mask")
    vision = adapter.vision_mask(input_ids=batch["input_ids"])
    valid = mask.bool() if mask is not None else torch.ones_like(vision)
    batch_size, length = vision.shape
    query = torch.full((batch_size,), length - 1)
    per_layer = []
    for i, layer in enumerate(layers):
        hidden, rope = inputs[i]
        per_layer.append(adapter.attention_probe(layer, hidden, query, rope, valid).mean(dim=1))  # (B, T)
    scores = torch.stack(per_layer, dim=1)  # (B, L, T)
    return [scores[row][:, vision[row]].cpu().numpy() for row in range(batch_size)]


def kendall_matrix(samples: Sequence[np.ndarray]) -> np.ndarray:
    """(L, L) mean Kendall τ between layers' vision-token rankings over samples."""
    num_layers = samples[0].shape[0]
    total = np.zeros((num_layers, num_layers))
    for scores in samples:
        for a in range(num_layers):
            for b in range(a, num_layers):
                tau = 1.0 if a == b else kendalltau(scores[a], scores[b]).statistic
                total[a, b] += tau
                total[b, a] = total[a, b]
    return total / len(samples)


def rank_analysis(model, batches: Sequence[dict]) -> dict:
    """{"kendall_tau": L×L list, "mean_tau_excluding_layer0", "mean_tau_with_layer0", "samples"}."""
    samples = [scores for batch in batches for scores in attention_rankings(model, batch)]
    matrix = kendall_matrix(samples)
    num_layers = matrix.shape[0]
    upper = [(a, b) for a in range(num_layers) for b in range(a + 1, num_layers)]
    deep = [matrix[a, b] for a, b in upper if a >= 1]
    with_first = [matrix[0, b] for b in range(1, num_layers)]
    return {
        "kendall_tau": matrix.round(4).tolist(),
        "mean_tau_excluding_layer0": float(np.mean(deep)) if deep else float("nan"),
        "mean_tau_with_layer0": float(np.mean(with_first)),
        "adjacent_tau": [float(matrix[layer, layer + 1]) for layer in range(num_layers - 1)],
        "samples": len(samples),
    }


def plot_kendall(result: dict, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(result["kendall_tau"])
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    image = ax.imshow(matrix, vmin=-0.2, vmax=1.0, cmap="viridis")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or "Kendall τ of vision-token attention rankings")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
