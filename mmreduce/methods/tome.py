"""Token merging (ToMe, Bolya et al., arXiv 2210.09461) as a before-the-LLM merge of the vision features.

ToMe merges tokens inside every ViT block; here its bipartite soft matching runs on the features as they enter the
language model, in rounds, until each panel (image, crop, tile or frame) is down to its budget. Tokens of different
panels never merge, and every kept token stays at its own prompt position (a merged token sits where its B token
was), unlike the reference code, which puts the unmerged A tokens before the B tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import check_ratio, register_method
from .before import BeforeLLMMethod, SignalRequest, TokenPlan, VisionTokens, group_by_panel, keep_count

__all__ = ["ToMe", "bipartite_merge_plan", "follow_round", "merge_rounds", "merged_sizes"]


def bipartite_merge_plan(features: torch.Tensor, sizes: torch.Tensor, r: int | Sequence[int],
                         groups: Sequence[Sequence[int]] | None = None) -> TokenPlan:
    """One round of bipartite soft matching: the r A tokens most similar to some B token merge into it.

    Within each group the tokens alternate A, B, A, B, ... in the order given; every A token's edge is its most
    cosine-similar B token of the same group (ties: the earlier B), and the r strongest edges merge (ties: the A
    token given first). Several A tokens may merge into one B token.

    Args:
        features: (n, C) the similarity metric of each token (features, or keys averaged over heads).
        sizes: (n,) float > 0, how many original tokens each token already stands for.
        r: merges in this round: an int (the r strongest edges over all groups together) or one int per group.
        groups: token indices of each group, in prompt order; tokens of different groups never merge.
            None: all n tokens form one group.

    Returns:
        A TokenPlan over the n tokens: merged A tokens are dropped and target their B token, every token weighs its
        size, so `plan.apply(x)` gives size-weighted averages and `merged_sizes(plan)` the new sizes.
    """
    if features.dim() != 2 or tuple(sizes.shape) != (features.shape[0],):
        raise ValueError(f"bipartite_merge_plan needs features (n, C) and sizes (n,), got {tuple(features.shape)} "
                         f"and {tuple(sizes.shape)}")
    count = features.shape[0]
    device = features.device
    groups = [list(range(count))] if groups is None else [list(g) for g in groups]
    side_a = [g[0::2] for g in groups]
    side_b = [g[1::2] for g in groups]
    a_index = torch.tensor([i for part in side_a for i in part], dtype=torch.long, device=device)  # (A,)
    b_index = torch.tensor([i for part in side_b for i in part], dtype=torch.long, device=device)  # (B,)
    a_group = torch.tensor([g for g, part in enumerate(side_a) for _ in part], dtype=torch.long, device=device)
    mergeable = [len(part) if side_b[g] else 0 for g, part in enumerate(side_a)]  # A tokens that have a partner
    if isinstance(r, (bool, torch.Tensor)) or not isinstance(r, (int, Sequence)):
        raise ValueError(f"r must be an int or one int per group, got {r!r}")
    if isinstance(r, int):
        if not 0 <= r <= sum(mergeable):
            raise ValueError(f"r={r} merges, but only {sum(mergeable)} A tokens have a B token of their group")
    elif len(r) != len(groups) or any(not 0 <= int(rg) <= m for rg, m in zip(r, mergeable)):
        raise ValueError(f"r per group must give one count per group ({len(groups)}) within its mergeable A tokens "
                         f"{mergeable}, got {list(r)}")

    plan = TokenPlan(torch.ones(count, dtype=torch.bool, device=device), torch.arange(count, device=device),
                     sizes.to(device=device, dtype=torch.float32).clone())
    if b_index.numel() == 0 or (r == 0 if isinstance(r, int) else sum(int(x) for x in r) == 0):
        return plan
    unit = F.normalize(features.float(), dim=-1)  # (n, C): dot products are cosines
    best = torch.full((a_index.shape[0],), float("-inf"), device=device)  # (A,) each A token's strongest edge
    partner = torch.zeros(a_index.shape[0], dtype=torch.long, device=device)  # (A,) its B token, into b_index
    start_a = start_b = 0
    for part_a, part_b in zip(side_a, side_b):
        # One similarity block per group: tokens of different groups are never compared.
        stop_a, stop_b = start_a + len(part_a), start_b + len(part_b)
        if part_b:
            block = unit[a_index[start_a:stop_a]] @ unit[b_index[start_b:stop_b]].T  # (A_g, B_g)
            # max returns the first of equal maxima: ties go to the earlier B token.
            best[start_a:stop_a], partner[start_a:stop_a] = block.max(dim=1)
            partner[start_a:stop_a] += start_b
        start_a, start_b = stop_a, stop_b
    # A stable descending sort keeps equal edges in A order, so ties merge the earlier A token.
    order = torch.sort(best, descending=True, stable=True).indices  # (A,)
    if isinstance(r, int):
        chosen = order[:r]
    else:
        rank_in_group = torch.empty_like(order)
        ordered_groups = a_group[order]
        for g in range(len(groups)):
            in_group = ordered_groups == g
            rank_in_group[in_group] = torch.arange(int(in_group.sum()), device=device)
        budget = torch.tensor([int(x) for x in r], dtype=torch.long, device=device)
        chosen = order[rank_in_group < budget[ordered_groups]]
    source = a_index[chosen]  # (r,)
    plan.keep[source] = False
    plan.target[source] = b_index[partner[chosen]]
    return plan


def merged_sizes(plan: TokenPlan) -> torch.Tensor:
    """(k,) sizes of the kept tokens after `plan`: each adds the weights (sizes) of the tokens merged into it."""
    total = torch.zeros_like(plan.weight)
    merged = plan.target >= 0
    total.index_add_(0, plan.target[merged], plan.weight[merged])
    return total[plan.keep]


def follow_round(step: TokenPlan, owner: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bookkeeping after one merge round over the c current tokens.

    Args:
        step: the round's plan over the current tokens (c,).
        owner: (n,) for every original token, the index of the current token that holds it.
        alive: (c,) the original index of each current token (its position in the prompt).

    Returns:
        owner: (n,) index among the c' survivors; alive: (c',) the survivors' original indices.
    """
    survivors = step.keep.nonzero().flatten()  # (c',)
    slot = torch.full((alive.shape[0],), -1, dtype=torch.long, device=alive.device)
    slot[survivors] = torch.arange(survivors.shape[0], device=alive.device)
    return slot[step.target[owner]], alive[survivors]


def merge_rounds(metric: torch.Tensor, groups: Sequence[Sequence[int]], budgets: Sequence[int],
                 max_share: float = 0.5) -> tuple[TokenPlan, int]:
    """Bipartite rounds until every group is down to its budget, at most `max_share` of a group's tokens per round.

    Args:
        metric: (n, C) similarity metric of the n tokens; merged tokens carry the size-weighted average of it.
        groups: token indices of each group, in prompt order.
        budgets: tokens each group keeps (1 <= budget <= its size).
        max_share: the most of a group's current tokens one round may merge (ToMe merges at most half: A's size).

    Returns:
        (plan, rounds): every original token targets the kept token it ended in, all with weight 1, so a kept token
        is the plain mean of its originals (what size-weighted averages of averages amount to); `plan.extra_flops`
        counts the matching (per round and group of c tokens: normalising 3cC, the A x B cosines 2·|A|·|B|·C, their
        maxima |A|·|B|, sorting the edges |A|·log2|A|, averaging the metric 2cC); the rounds run.
    """
    count, width = metric.shape
    device = metric.device
    group_of = torch.empty(count, dtype=torch.long, device=device)  # (n,)
    for g, members in enumerate(groups):
        group_of[torch.tensor(list(members), dtype=torch.long, device=device)] = g
    alive = torch.arange(count, device=device)  # (c,) original index of each current token, ascending
    owner = torch.arange(count, device=device)  # (n,) current slot that each original token ended in
    sizes = torch.ones(count, device=device)  # (c,)
    current = metric.float()  # (c, C)
    rounds, flops = 0, 0.0
    while True:
        current_group = group_of[alive]  # (c,)
        now = torch.bincount(current_group, minlength=len(groups)).tolist()
        per_group = [min(n - budget, int(max_share * n)) for n, budget in zip(now, budgets)]
        if sum(per_group) == 0:
            break
        slots = [(current_group == g).nonzero().flatten().tolist() for g in range(len(groups))]
        step = bipartite_merge_plan(current, sizes, per_group, slots)
        for n in now:
            half_a, half_b = (n + 1) // 2, n // 2
            flops += 5 * n * width + 2 * half_a * half_b * width + half_a * half_b + half_a * math.log2(max(half_a, 2))
        # Size-weighted averages of the metric, (c', C): sum of size·metric over each target, over the summed size.
        weighted = torch.zeros_like(current).index_add_(0, step.target, current * sizes[:, None])
        total = torch.zeros_like(sizes).index_add_(0, step.target, sizes)
        current, sizes = weighted[step.keep] / total[step.keep, None], total[step.keep]
        owner, alive = follow_round(step, owner, alive)
        rounds += 1
    keep = torch.zeros(count, dtype=torch.bool, device=device)
    keep[alive] = True
    return TokenPlan(keep, alive[owner], torch.ones(count, device=device), extra_flops=flops), rounds


@register_method("tome")
@dataclass
class ToMe(BeforeLLMMethod):
    """Merge each panel's tokens by bipartite soft matching until it keeps ⌈keep_ratio·p⌉ of its p tokens.

    Each round splits a panel's current tokens alternately into A and B (in prompt order), links every A token to
    its most similar B token (cosine), and merges the strongest edges, at most half of the panel per round, with
    size-weighted averages (a token's size counts the original tokens it stands for), so a kept token ends as the
    mean of the features merged into it. Tokens of different panels (the base image and each crop, tile or frame)
    never merge; LLaVA-NeXT's newline tokens go with any merged image.

    Parameters:
        keep_ratio: r in (0, 1], the share of every panel's tokens kept.
        metric: "features" (the features entering the LLM, the default) or "keys" (the vision tower's keys at
            `key_layer`, mean over heads, as ToMe's own metric; merged tokens average their keys too).
        key_layer: the tower layer read when metric="keys" (negative counts from the end).
    """

    keep_ratio: float = 0.25
    metric: str = "features"
    key_layer: int = -2
    needs_layout = True

    def __post_init__(self):
        check_ratio("ToMe", "keep_ratio", self.keep_ratio)
        if self.metric not in ("features", "keys"):
            raise ValueError(f"ToMe.metric must be 'features' or 'keys', got {self.metric!r}")
        if isinstance(self.key_layer, bool) or not isinstance(self.key_layer, int):
            raise ValueError(f"ToMe.key_layer must be an integer tower layer (e.g. -2), got {self.key_layer!r}")

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "ToMe":
        return cls(keep_ratio=1.0 if keep_all else 0.25)

    def signal_requests(self) -> list[SignalRequest]:
        return [SignalRequest("keys", self.key_layer)] if self.metric == "keys" else []

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        groups = list(group_by_panel(tokens.cells).values()) if tokens.cells is not None \
            else [list(range(tokens.count))]
        metric = tokens.features if self.metric == "features" else \
            tokens.signals[SignalRequest("keys", self.key_layer).key]  # (n, C)
        budgets = [keep_count(self.keep_ratio, len(members)) for members in groups]
        plan, _ = merge_rounds(metric, groups, budgets)
        plan.extra_flops += 2.0 * tokens.count * tokens.features.shape[1]  # averaging the features once
        return plan
