"""AIM (Zhong et al., ICCV 2025, arXiv 2412.03248): merge similar vision features before the LLM, then prune the
survivors layer by layer inside it, ranked by PageRank on each layer's prefill attention.

Two parts in one method:

* Before the LLM (`AIMMerge`): within every image, crop, tile or frame, ToMe-style bipartite matching on the cosine
  similarity of the features entering the LLM, at most half of the tokens merged per round, rounds until
  ⌈merge_ratio·p⌉ of a panel's p tokens remain. Unlike the paper's code, the kept tokens stay in prompt (spatial)
  order. Videos (`frame_similarity` set) then merge across frames: see `AIMMerge`.
* Inside the LLM: from layer l1 = `start_layer` on, the layers after layer l keep retain(l) = max(0, 1 − (l − l1 +
  1)·step) of the vision tokens that entered the LLM, physically dropped (until none is left or the model ends).
  The rank is PageRank on a layer's full prefill attention: M = softmax(A/τ) per head (A = the scaled q·k logits,
  causal, over the sample's own prompt tokens), dist₀ = 1/N over those N tokens, `iterations` steps dist ← dist·M,
  importance = sqrt(mean over heads of dist²). Text tokens are never candidates.

Where this differs from the paper's code: it masks attention (every token stays a query and counts in N) and runs
eager attention; here the stream really gets shorter, so pruned tokens leave the graph, and the logits are
recomputed from the layer's own norm, q/k projections and RoPE (GQA-aware), so the layer keeps its attention
implementation. The drop after layer l is ranked at the input of layer l + 1, i.e. with that layer's attention
over the same tokens layer l saw, where the paper uses layer l's own; counts are ⌈retain(l)·n⌉ where it floors.
Merged tokens keep their places (the paper's code puts the unmerged A tokens first). The merge's cost is added to
`stats.extra_flops`; PageRank's (T x T logits at every scored layer) is not counted.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from mmreduce.probe import apply_rotary

from .base import DropStage, ReductionMethod, ScoreContext, check_layer, check_ratio, register_method
from .before import BeforeLLMMethod, TokenPlan, VisionTokens, group_by_panel, keep_count
from .tome import bipartite_merge_plan, follow_round

__all__ = ["AIM", "AIMMerge", "frame_runs", "merge_across_frames", "merge_in_rounds", "pagerank_distribution",
           "pagerank_importance", "prompt_attention_logits", "prompt_tokens", "retain_fraction",
           "stream_queries_and_keys"]

#: Bytes of float32 attention probabilities one PageRank chunk may hold; heads are processed in chunks below it.
_CHUNK_BYTES = 1 << 28


def retain_fraction(layer: int, start_layer: int, step: float) -> float:
    """The paper's schedule: the share of the LLM's vision tokens kept after layer `layer` (1 before `start_layer`).

    retain(l) = max(0, 1 − (l − l1 + 1)·step) for l >= l1; e.g. l1 = 4, step 0.125: 0.875 after layer 4, 0.75
    after layer 5, ..., 0 after layer 11.
    """
    if layer < start_layer:
        return 1.0
    return max(0.0, 1.0 - (layer - start_layer + 1) * step)


def prompt_attention_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention logits of every query of one prompt over its keys, causal (later keys are -inf).

    Args:
        query: (H, n, hd) post-RoPE queries of the prompt's n tokens (in order, no padding).
        key: (Hkv, n, hd) post-RoPE keys; H must be a multiple of Hkv (query head h reads key head h // (H/Hkv)).
        scaling: the attention scale (usually hd ** -0.5).

    Returns:
        (H, n, n) float32 logits, query i's row holding keys 0..i, the rest -inf.
    """
    heads, kv_heads, count = query.shape[0], key.shape[0], query.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    key = key.float().repeat_interleave(heads // kv_heads, dim=0)  # (Hkv, n, hd) -> (H, n, hd)
    logits = torch.matmul(query.float(), key.transpose(1, 2)) * scaling  # (H, n, n)
    future = torch.ones(count, count, dtype=torch.bool, device=query.device).triu(1)  # (n, n) key after query
    return logits.masked_fill(future, float("-inf"))


def pagerank_distribution(logits: torch.Tensor, tau: float = 0.1, iterations: int = 5) -> torch.Tensor:
    """PageRank mass of every token, per head, on the attention graph of one prompt.

    Args:
        logits: (H, n, n) attention logits, row i = query i; keys it may not see are -inf (each row sees one at
            least: causal rows see themselves).
        tau: temperature: M = softmax(logits / tau) over the keys of each row.
        iterations: power-iteration steps dist ← dist·M from dist₀ = 1/n (mass flows from a query to its keys).

    Returns:
        (H, n) float32 distribution after `iterations` steps (each head's row sums to 1).
    """
    heads, count = logits.shape[0], logits.shape[-1]
    transition = (logits.float() / tau).softmax(dim=-1)  # (H, n, n), rows sum to 1
    dist = torch.full((heads, 1, count), 1.0 / count, dtype=torch.float32, device=logits.device)  # (H, 1, n)
    for _ in range(iterations):
        dist = torch.bmm(dist, transition)  # (H, 1, n) @ (H, n, n) -> (H, 1, n)
    return dist.squeeze(1)


def pagerank_importance(logits: torch.Tensor, tau: float = 0.1, iterations: int = 5) -> torch.Tensor:
    """(H, n, n) logits -> (n,) importance = sqrt(mean over heads of the PageRank mass squared)."""
    return pagerank_distribution(logits, tau, iterations).square().mean(dim=0).sqrt()


def prompt_tokens(ctx: ScoreContext) -> torch.Tensor:
    """(B, T) bool: the stream's real prompt tokens, i.e. valid and not after the last prompt token (a cache-free
    generate() recomputes the prompt with the generated tokens appended; they must not change the ranks)."""
    positions = torch.arange(ctx.key_valid.shape[1], device=ctx.key_valid.device)
    return ctx.key_valid & (positions[None, :] <= ctx.query_index[:, None])


def stream_queries_and_keys(ctx: ScoreContext, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries and keys of the chosen tokens of the scoring layer's stream, as the layer computes them.

    The adapter's `query_and_keys` gives one query per sample; every projection before attention is per token
    (norms, q/k projections, q/k norms, DocOwl's modality routing), so handing it each chosen token as a sample of
    length 1 yields every token's query and key in one call, family specifics included.

    Args:
        ctx: the scoring context.
        tokens: (B, T) bool, the tokens wanted.

    Returns:
        query: (N, H, hd) and key: (N, Hkv, hd), N = tokens.sum(), row by row, each row in stream order.
    """
    batch, length = tokens.shape
    hidden = ctx.hidden[tokens].unsqueeze(1)  # (B, T, D) -> (N, 1, D)
    per_token = {}
    for name in ctx.adapter.per_token_layer_kwargs:
        value = ctx.layer_kwargs.get(name)
        if value is not None:
            value = value.expand(batch, length, *value.shape[2:])  # (B or 1, T, ...) -> (B, T, ...)
            per_token[name] = value[tokens].unsqueeze(1)  # (N, 1, ...)
    first = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    query, key = ctx.adapter.query_and_keys(ctx.layer, hidden, first, per_token)  # (N, H, hd), (N, 1, Hkv, hd)
    cos, sin = (t.expand(batch, -1, -1)[tokens].unsqueeze(1) for t in ctx.position_embeddings)  # (N, 1, hd)
    return apply_rotary(query, cos, sin), apply_rotary(key.squeeze(1), cos, sin)


# ---- before the LLM: iterative merge --------------------------------------------------------------------------

def merge_in_rounds(features: torch.Tensor, groups: list[list[int]], budgets: list[int]) -> tuple[TokenPlan, int]:
    """AIM's iterative merge: bipartite rounds (at most half of a group's current tokens each) until every group is
    down to its budget; each round replaces a B token by the plain mean of itself and the A tokens merged into it
    (the paper's mean over current tokens, not weighted by how many originals each stands for).

    Args:
        features: (n, D) the features; similarity is cosine on the current (merged) features of each round.
        groups: token indices of each group (a panel or frame), in prompt order; groups never mix.
        budgets: tokens each group keeps (1 <= budget <= its size).

    Returns:
        (plan, rounds): every original token targets the kept token it ended in, weighted by its share of it (the
        product over rounds of 1 / the size of the merge it took part in; each kept token's shares sum to 1).
    """
    count = features.shape[0]
    device = features.device
    group_of = torch.empty(count, dtype=torch.long, device=device)  # (n,)
    for g, members in enumerate(groups):
        group_of[torch.tensor(members, dtype=torch.long, device=device)] = g
    alive = torch.arange(count, device=device)  # (c,) original index of every current token, ascending
    owner = torch.arange(count, device=device)  # (n,) the current token each original one is part of
    share = torch.ones(count, dtype=torch.float64, device=device)  # (n,) weight inside its current token
    current = features.float()  # (c, D)
    rounds = 0
    while True:
        current_group = group_of[alive]  # (c,)
        sizes = torch.bincount(current_group, minlength=len(groups)).tolist()
        per_group = [min(size - budget, size // 2) for size, budget in zip(sizes, budgets)]
        if sum(per_group) == 0:
            break
        slots = [(current_group == g).nonzero().flatten().tolist() for g in range(len(groups))]
        step = bipartite_merge_plan(current, torch.ones(alive.shape[0], device=device), per_group, slots)
        members = torch.bincount(step.target, minlength=alive.shape[0])  # (c,) current tokens in each merge
        share = share / members[step.target[owner]].double()
        current = step.apply(current)  # (c', D) plain means of the merged current tokens
        owner, alive = follow_round(step, owner, alive)
        rounds += 1
    keep = torch.zeros(count, dtype=torch.bool, device=device)
    keep[alive] = True
    return TokenPlan(keep, alive[owner], share.float()), rounds


def frame_runs(groups: list[list[int]], cells: list) -> list[list[int]]:
    """The group indices of every run of consecutive groups with the same token grid (the frames of a video: one
    image per frame, or one panel per temporal slice); runs of one group are left out."""
    runs: list[list[int]] = []
    grids = [tuple((cells[i].row, cells[i].col) for i in members) for members in groups]
    for g, grid in enumerate(grids):
        if g and grid == grids[g - 1]:
            runs[-1].append(g)
        else:
            runs.append([g])
    return [run for run in runs if len(run) > 1]


def merge_across_frames(plan: TokenPlan, features: torch.Tensor, frames: list[list[int]], cells: list,
                        threshold: float) -> tuple[TokenPlan, int]:
    """After the per-frame merge: a token kept at grid cell (r, c) of a frame joins the token kept at the same cell
    of the previous frame when their merged features have cosine similarity >= `threshold`; chains run through
    the frames, so a static cell collapses into its first frame's token (which keeps its place). A chain's token
    is the plain mean of its frames' tokens.

    Args:
        plan: the per-frame plan over the n tokens.
        features: (n, D) the original features.
        frames: per run of frames, the token indices of each frame in order (`frame_runs` of the groups).
        cells: the n tokens' cells.
        threshold: cosine threshold in (0, 1].

    Returns:
        (plan, compared): the plan with the chains merged, and the number of same-cell pairs compared.
    """
    kept = plan.keep.nonzero().flatten()  # (k,)
    merged = plan.apply(features).float()  # (k, D)
    unit = torch.nn.functional.normalize(merged, dim=-1)
    slot = {int(index): j for j, index in enumerate(kept.tolist())}
    root = {int(index): int(index) for index in kept.tolist()}  # kept token -> the kept token its chain ends in
    compared = 0
    for run in frames:
        for previous, frame in itertools.pairwise(run):
            at_cell = {(cells[i].row, cells[i].col): i for i in previous if i in slot}
            for i in frame:
                j = at_cell.get((cells[i].row, cells[i].col)) if i in slot else None
                if j is None:
                    continue
                compared += 1
                if float(unit[slot[i]] @ unit[slot[j]]) >= threshold:
                    root[i] = root[j]
    chain_size: dict[int, int] = {}
    for token in root.values():
        chain_size[token] = chain_size.get(token, 0) + 1
    kept_target = plan.target.clone()
    weight = plan.weight.clone()
    for index in range(plan.target.shape[0]):
        target = int(plan.target[index])
        if target < 0:
            continue
        kept_target[index] = root[target]
        weight[index] = plan.weight[index] / chain_size[root[target]]
    keep = plan.keep.clone()
    for token, end in root.items():
        if token != end:
            keep[token] = False
    return TokenPlan(keep, kept_target, weight, plan.extra_flops), compared


@dataclass
class AIMMerge(BeforeLLMMethod):
    """AIM's part before the LLM (what `AIM.before_stage` returns; not registered on its own).

    Every panel (image, crop, tile, frame) is merged on its own with `merge_in_rounds` to ⌈merge_ratio·p⌉ of its p
    tokens, kept tokens in prompt order. With `frame_similarity` set, runs of consecutive panels with the same token
    grid are frames of a video and then merge across frames with `merge_across_frames`: that second step removes
    as many tokens as the frames are alike, so the planned count (⌈merge_ratio·p⌉ per panel) is an upper bound.

    Parameters:
        merge_ratio: the share of every panel's tokens kept, in (0, 1].
        frame_similarity: None, or the cosine threshold of the merge across frames, in (0, 1].
    """

    merge_ratio: float = 0.25
    frame_similarity: float | None = None
    name = "aim"
    needs_layout = True

    def __post_init__(self):
        check_ratio("AIM", "merge_ratio", self.merge_ratio)
        if self.frame_similarity is not None:
            check_ratio("AIM", "frame_similarity", self.frame_similarity)

    def kept_tokens(self, available: int) -> int:
        return keep_count(self.merge_ratio, available)

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        groups = list(group_by_panel(tokens.cells).values()) if tokens.cells is not None \
            else [list(range(tokens.count))]
        budgets = [keep_count(self.merge_ratio, len(members)) for members in groups]
        plan, rounds = merge_in_rounds(tokens.features, groups, budgets)
        width = tokens.features.shape[1]
        # Per round and panel of p tokens at most: normalising (3pD), the A x B cosines (2·⌈p/2⌉·⌊p/2⌋·D) and
        # the averages (2pD); then the kept tokens' averages of the features (2nD).
        per_round = sum(5 * len(m) * width + 2 * math.ceil(len(m) / 2) * (len(m) // 2) * width for m in groups)
        plan.extra_flops = float(rounds * per_round + 2 * tokens.count * width)
        if self.frame_similarity is not None and tokens.cells is not None:
            frames = [[groups[g] for g in run] for run in frame_runs(groups, tokens.cells)]
            if frames:
                plan, compared = merge_across_frames(plan, tokens.features, frames, tokens.cells,
                                                     self.frame_similarity)
                plan.extra_flops += float(2 * tokens.count * width + 2 * compared * width)
        return plan


@register_method("aim")
@dataclass
class AIM(ReductionMethod):
    """AIM: similarity merge before the LLM, then PageRank-ranked pruning on a linear schedule inside it.

    Parameters:
        merge_ratio: share of every panel's tokens left by the merge, in (0, 1]; 1 merges nothing (pruning only).
        start_layer: l1, the first layer after which tokens are pruned (the layers after it see fewer); >= 0.
        step: the share of the LLM's vision tokens dropped after every layer from l1 on, in [0, 1]; 0 prunes
            nothing (the schedule keeps all).
        tau: the PageRank temperature (> 0).
        iterations: PageRank power-iteration steps (>= 1).
        frame_similarity: None (images, crops, tiles: no merge across panels) or a cosine threshold in (0, 1]:
            videos merge a token into the token at the same grid cell of the previous frame when at least this
            similar (see `AIMMerge`).
    """

    merge_ratio: float = 0.25
    start_layer: int = 14
    budget_field = "merge_ratio"  # `aim:equivalent=F` fits the merge to the budget, the schedule as given
    step: float = 0.125
    tau: float = 0.1
    iterations: int = 5
    frame_similarity: float | None = None

    def __post_init__(self):
        check_ratio("AIM", "merge_ratio", self.merge_ratio)
        check_layer("AIM", "start_layer", self.start_layer, minimum=0)
        check_ratio("AIM", "step", self.step, allow_zero=True)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0 \
                or math.isinf(self.tau):
            raise ValueError(f"AIM.tau must be a number > 0 (the PageRank temperature), got {self.tau!r}")
        check_layer("AIM", "iterations", self.iterations)
        if self.frame_similarity is not None:
            check_ratio("AIM", "frame_similarity", self.frame_similarity)

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "AIM":
        """Pruning only (merge_ratio 1, so every family runs it): from layer ⌊L/3⌋ (>= 1 where the depth allows)
        on, down to 1/(L − l1) at the last layer (6 layers: 1, 1, 1, .75, .5, .25); keep_all prunes with step 0."""
        if num_layers < 2:
            raise NotImplementedError("AIM prunes after a layer that another layer follows; a model needs 2 layers")
        start = min(max(1, num_layers // 3), num_layers - 2)
        if keep_all:
            return cls(merge_ratio=1.0, start_layer=start, step=0.0)
        return cls(merge_ratio=1.0, start_layer=start, step=1.0 / (num_layers - start))

    def before_stage(self) -> AIMMerge | None:
        """The merge before the LLM, or None when it would keep every token (merge_ratio 1, no frame merge)."""
        if self.merge_ratio == 1.0 and self.frame_similarity is None:
            return None
        return AIMMerge(self.merge_ratio, self.frame_similarity)

    def planned_counts(self, num_layers: int, initial: int) -> list[int]:
        """Vision tokens entering each layer for one panel of `initial` tokens: the merge's ⌈merge_ratio·n⌉, then
        ⌈retain(l)·that⌉ after every layer l >= l1 (an upper bound for videos that also merge across frames)."""
        merge = self.before_stage()
        return super().planned_counts(num_layers, merge.kept_tokens(initial) if merge is not None else initial)

    def stages(self, num_layers: int) -> list[DropStage]:
        """One stage per layer l from l1 (while a layer follows it): ranked by layer l's own attention (at its input,
        over the tokens it sees), the layers after l keep retain(l); the stage that reaches 0 is the last."""
        if self.start_layer > num_layers - 2:
            raise ValueError(f"AIM.start_layer {self.start_layer} leaves no layer to prune in a model with "
                             f"{num_layers} decoder layers (valid: 0..{num_layers - 2})")
        stages = []
        for layer in range(self.start_layer, num_layers - 1):
            fraction = retain_fraction(layer, self.start_layer, self.step)
            stages.append(DropStage(score_layer=layer, apply_layer=layer + 1, fraction=fraction))
            if fraction == 0.0:
                break
        return stages

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, T) PageRank importance of every stream token at the scoring layer (0 on padding and filler)."""
        scores = torch.zeros(ctx.key_valid.shape, dtype=torch.float32, device=ctx.hidden.device)  # (B, T)
        # This layer ranks the drop after itself (see `stages`); keeping all or none needs no ranks.
        if retain_fraction(ctx.layer_idx, self.start_layer, self.step) in (0.0, 1.0):
            return scores
        tokens = prompt_tokens(ctx)  # (B, T)
        query, key = stream_queries_and_keys(ctx, tokens)  # (N, H, hd), (N, Hkv, hd)
        scaling = ctx.layer.self_attn.scaling
        start = 0
        for row, count in enumerate(tokens.sum(dim=1).tolist()):
            # One sample at a time over its own tokens only: its ranks cannot depend on padding or the batch.
            row_query = query[start:start + count].transpose(0, 1)  # (n, H, hd) -> (H, n, hd)
            row_key = key[start:start + count].transpose(0, 1)  # (n, Hkv, hd) -> (Hkv, n, hd)
            start += count
            if count:
                scores[row, tokens[row]] = self._importance(row_query, row_key, scaling)
        return scores

    def _importance(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """(H, n, hd), (Hkv, n, hd) -> (n,) importance, heads in chunks of whole key groups to bound memory."""
        heads, kv_heads, count = query.shape[0], key.shape[0], query.shape[1]
        group = heads // kv_heads
        chunk_kv = max(1, _CHUNK_BYTES // (4 * count * count * group))
        squared = torch.zeros(count, dtype=torch.float32, device=query.device)
        for first in range(0, kv_heads, chunk_kv):
            kv = key[first:first + chunk_kv]  # (h_kv, n, hd)
            q = query[first * group:(first + kv.shape[0]) * group]  # (h_kv * G, n, hd)
            logits = prompt_attention_logits(q, kv, scaling)  # (h, n, n)
            squared += pagerank_distribution(logits, self.tau, self.iterations).square().sum(dim=0)
        return (squared / heads).sqrt()
