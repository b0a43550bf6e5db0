"""VisionZip (Yang et al., arXiv 2412.04467): keep the tokens the vision tower's CLS token attends to most (dominant)
and fold the rest into a few contextual tokens by key similarity, before the language model.

Where this differs from the paper, and why:
  * The paper keeps the CLS token among the dominant ones; the features that enter the LLM here are the ones the
    family feeds it (LLaVA drops CLS), so all dominant tokens are patch tokens.
  * The paper forms a contextual token as target + mean(assigned) in the tower's feature space, before the
    projector. A `TokenPlan` averages features as they enter the LLM (its weights are normalised), so here the
    contextual token is (target + mean(assigned)) / 2: the same mix of the two, at the scale of one embedding, which
    is what the LLM's inputs expect after the projector.
  * Kept tokens stay in prompt order: a contextual token sits at its target's position (the paper appends the
    contextual tokens after the dominant ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import check_ratio, register_method
from .before import BeforeLLMMethod, SignalRequest, TokenPlan, VisionTokens, group_by_panel, keep_count

__all__ = ["VisionZip", "contextual_count", "visionzip_plan"]

#: The vision-tower layer the paper reads (CLS attention and keys): the second to last.
TOWER_LAYER = -2
CLS_ATTENTION = SignalRequest("cls_attention", TOWER_LAYER)
KEYS = SignalRequest("keys", TOWER_LAYER)


def contextual_count(kept: int, share: float) -> int:
    """Contextual tokens among `kept`: round(share·kept), halves up (64 at 10/64 gives 10, as the paper's 54 + 10),
    leaving at least one dominant token."""
    return min(kept - 1, math.floor(share * kept + 0.5 + 1e-9))


def visionzip_plan(attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int) -> TokenPlan:
    """VisionZip on one panel's p tokens.

    Args:
        attention: (p,) the CLS token's attention to each token (any positive multiple of the head sum ranks alike:
            the mean over heads is the sum divided by the head count).
        keys: (p, C) each token's key, averaged over heads.
        dominant: tokens kept for their CLS attention (top-`dominant`, ties toward the earlier token).
        contextual: targets chosen among the remaining tokens in prompt order at stride max(1, R // contextual),
            starting at the first; every other remaining token joins the target whose key is most cosine-similar
            (ties: the earlier target).

    Returns:
        A TokenPlan keeping dominant + contextual tokens in prompt order; a target with m >= 1 tokens assigned
        becomes (target + mean(assigned)) / 2 (target weight 1, each assigned token 1/m), one with none stays as is.
    """
    count = attention.shape[0]
    device = attention.device
    if not 1 <= dominant <= count or contextual < 0 or dominant + contextual > count:
        raise ValueError(f"visionzip_plan: dominant={dominant} and contextual={contextual} do not fit {count} tokens "
                         "(need 1 <= dominant and dominant + contextual <= tokens)")
    order = torch.sort(attention.float(), descending=True, stable=True).indices  # (p,)
    keep = torch.zeros(count, dtype=torch.bool, device=device)
    keep[order[:dominant]] = True
    target = torch.where(keep, torch.arange(count, device=device), -1)
    weight = keep.float()
    if contextual == 0:
        return TokenPlan(keep, target, weight)
    remaining = (~keep).nonzero().flatten()  # (R,) in prompt order
    step = max(1, remaining.shape[0] // contextual)
    is_target = torch.zeros(remaining.shape[0], dtype=torch.bool, device=device)
    is_target[torch.arange(0, remaining.shape[0], step, device=device)[:contextual]] = True
    targets, others = remaining[is_target], remaining[~is_target]  # (c,), (R - c,)
    keep[targets] = True
    target[targets] = targets
    weight[targets] = 1.0
    if others.numel():
        unit = F.normalize(keys.float(), dim=-1)  # (p, C): dot products are cosines
        similarity = unit[others] @ unit[targets].T  # (R - c, c)
        choice = similarity.argmax(dim=1)  # (R - c,): argmax returns the first of equal maxima, the earlier target
        assigned = torch.bincount(choice, minlength=targets.shape[0]).float()  # (c,) m per target
        target[others] = targets[choice]
        weight[others] = 1.0 / assigned[choice]
    return TokenPlan(keep, target, weight)


@register_method("visionzip")
@dataclass
class VisionZip(BeforeLLMMethod):
    """Per panel of p tokens (an image, or each anyres crop as the paper does), keep k = ⌈keep_ratio·p⌉ tokens:
    k - c dominant ones by the CLS token's attention at tower layer -2, and c = round(contextual_share·k) contextual
    ones that merge the rest by the similarity of their layer -2 keys. An image keeps the sum over its panels.

    The paper's 64-token setting on LLaVA-1.5 (54 dominant + 10 contextual of 576) is keep_ratio=64/576 with the
    default contextual_share=10/64; its 128 (108 + 20) and 192 (162 + 30) are keep_ratio=128/576 and 192/576.
    Needs a vision tower with a CLS token (Qwen2-VL has none and is refused at wrap).

    Parameters:
        keep_ratio: r in (0, 1], the share of every panel's tokens kept.
        contextual_share: in [0, 1), the share of the kept tokens that are contextual (at least one stays dominant).
    """

    keep_ratio: float = 0.25
    contextual_share: float = 10 / 64
    needs_layout = True

    def __post_init__(self):
        check_ratio("VisionZip", "keep_ratio", self.keep_ratio)
        share = self.contextual_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ValueError(f"VisionZip.contextual_share must be in [0, 1) (the share of kept tokens that are "
                             f"contextual; the paper's 54 + 10 is 10/64), got {share!r}")

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "VisionZip":
        return cls(keep_ratio=1.0 if keep_all else 0.25)

    def signal_requests(self) -> list[SignalRequest]:
        return [CLS_ATTENTION, KEYS]

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        attention = tokens.signals[CLS_ATTENTION.key]  # (n,)
        keys = tokens.signals[KEYS.key]  # (n, C)
        groups = list(group_by_panel(tokens.cells).values()) if tokens.cells is not None \
            else [list(range(tokens.count))]
        device = tokens.features.device
        keep = torch.zeros(tokens.count, dtype=torch.bool, device=device)
        target = torch.full((tokens.count,), -1, dtype=torch.long, device=device)
        weight = torch.zeros(tokens.count, device=device)
        flops = 0.0
        for members in groups:
            index = torch.tensor(members, dtype=torch.long, device=device)  # (p,)
            kept = keep_count(self.keep_ratio, len(members))
            contextual = contextual_count(kept, self.contextual_share)
            local = visionzip_plan(attention[index].to(device), keys[index].to(device), kept - contextual, contextual)
            keep[index] = local.keep
            target[index] = torch.where(local.target >= 0, index[local.target.clamp(min=0)], -1)
            weight[index] = local.weight
            flops += self._flops(len(members), kept - contextual, contextual, keys.shape[1], tokens.features.shape[1])
        return TokenPlan(keep, target, weight, extra_flops=flops)

    @staticmethod
    def _flops(count: int, dominant: int, contextual: int, key_width: int, width: int) -> float:
        """Sorting the CLS attention (p·log2 p comparisons), normalising the remaining keys (3RC), their cosines
        with the targets (2·(R - c)·c·C) and the argmax, and the contextual averages (2RD)."""
        if contextual == 0:
            return float(count * math.log2(max(count, 2)))
        remaining = count - dominant
        merged = remaining - contextual
        return float(count * math.log2(max(count, 2)) + 3 * remaining * key_width
                     + 2 * merged * contextual * key_width + merged * contextual + 2 * remaining * width)
