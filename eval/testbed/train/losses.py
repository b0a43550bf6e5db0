"""The per-patch losses of `train-tiny` (and the accuracy it logs): what the image tokens must tell about the
object under them, and the read-out the answer position shares with them."""

from __future__ import annotations

import torch

from .targets import class_layout

__all__ = ["aux_loss", "match_loss", "patch_accuracy", "patch_loss"]


def aux_loss(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor, benchmark: str,
             grid: int = 0) -> torch.Tensor:
    """features: (..., N, D) projector output; targets: (..., N) packed ids (`class_layout`; -100 = none).

    With `grid` > 0 (LLaVA-1.5, N = grid * grid in row-major order) the head also predicts every token's row and
    column, so that the tokens carry where they are (the `position` questions compare two objects' places).
    """
    logits = head(features)  # (..., N, C)
    base, n_col, n_other = class_layout(benchmark)
    colour = torch.where(targets >= 0, targets // base, -100)
    other = torch.where(targets >= 0, targets % base, -100)
    ce = torch.nn.functional.cross_entropy
    loss = (ce(logits[..., :n_col].flatten(0, -2), colour.flatten(), ignore_index=-100)
            + ce(logits[..., n_col:n_col + n_other].flatten(0, -2), other.flatten(), ignore_index=-100))
    if grid:
        cells = torch.arange(grid * grid)
        where = logits[..., n_col + n_other:].flatten(0, -2)  # (B*N, 2 * grid)
        rows, cols = (cells // grid).repeat(features.shape[0]), (cells % grid).repeat(features.shape[0])
        loss = loss + ce(where[:, :grid], rows) + ce(where[:, grid:], cols)
    return loss


def match_loss(head: torch.nn.Linear, vision: torch.Tensor, targets: torch.Tensor, query: torch.Tensor,
               named: torch.Tensor, benchmark: str) -> torch.Tensor:
    """One attribute read-out shared by the image tokens and the answer position, at one layer's attention input.

    vision: (M, D) normalised image-token states with (M,) packed per-patch ids (-100 = none); query: (B, D) the
    answer position's; named: (B, C) multi-hot of the classes each question names (`named_classes`). Sharing the
    head puts "square" in the same directions on the square's token and on a question about the square, which is
    what a query-key match needs (with `tie_qk_init`, the keys start as the queries).
    """
    loss = aux_loss(head, vision, targets, benchmark)  # the image tokens' own classes
    guess = head(query)[:, :named.shape[1]]  # (B, C)
    return loss + torch.nn.functional.binary_cross_entropy_with_logits(guess, named) * named.shape[1] / 2


def patch_loss(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor, benchmark: str, grid: int,
               object_focus: bool) -> torch.Tensor:
    """`aux_loss`, plus (with `object_focus`) the same loss over the object tokens alone.

    Objects cover ~5% of the tokens, so in the plain mean the easy background dominates; a shape, unlike a colour,
    is not readable from one patch and is learnt only when the object tokens carry their own weight.
    """
    loss = aux_loss(head, features, targets, benchmark, grid)
    if object_focus:
        on_object = targets > 0  # (..., N)
        if on_object.any():
            loss = loss + aux_loss(head, features[on_object], targets[on_object], benchmark)
    return loss


def patch_accuracy(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor, benchmark: str
                   ) -> tuple[float, float]:
    """Per-patch accuracy on object tokens of the colour plane and of the shape / digit plane."""
    on_object = targets > 0
    base, n_col, n_other = class_layout(benchmark)
    with torch.no_grad():
        logits = head(features[on_object])  # (M, C)
        wanted = targets[on_object]
        colour = (logits[:, :n_col].argmax(-1) == wanted // base).float().mean().item()
        other = (logits[:, n_col:n_col + n_other].argmax(-1) == wanted % base).float().mean().item()
    return colour, other
