"""Token merging (ToMe, Bolya et al., arXiv 2210.09461) inside a timm or open_clip Vision Transformer.

    import mmreduce
    with mmreduce.patch_vit(vit, r=16) as merging:   # every block merges 16 tokens after its attention
        features = vit(images)
        print(merging.tokens_per_block)               # [181, 165, ..., 37, 21, 11] for a ViT-B/16 at 224 px
    # leaving the block restores the model: its outputs are bit-identical to before

What one patched block computes (pre-norm block `x + attn(norm1(x))`, then `x + mlp(norm2(x))`):

  1. attention with *proportional attention*: every key's logit gets `+ log(size)`, where `size` counts the original
     patches a token stands for, so a token of size s weighs in the softmax as s identical tokens would;
  2. the keys averaged over heads, `(B, N, head_dim)`, are the similarity metric;
  3. `bipartite_soft_matching` merges `r` tokens into their most similar partners (size-weighted average,
     sizes add) between the attention and the MLP, so the MLP and every later block run on N - r tokens.

Unlike the reference implementation, the merged sequence keeps the surviving tokens in their ORIGINAL ORDER (the
reference concatenates unmerged A tokens before B tokens). Attention is permutation-equivariant and the CLS token
stays first, so the model's outputs do not depend on this choice; keeping the order makes the merged sequence
readable as a coarser version of the patch grid.

The patch replaces `forward` on the block *instances* and the pooling method on the model instance (it changes
only average pooling and delegates everything else); the classes are never touched and `remove()` puts every
attribute back as it was. Pooling: CLS-token pooling works unchanged; average pooling ('avg', 'avgmax' in timm, 'avg' in open_clip) becomes the
size-weighted average, i.e. the mean over the original patches. Anything that reads the token sequence itself
(`forward_features`, open_clip's `output_tokens`) receives the merged, shorter sequence; the sizes of the last
forward are in `handle.last_size`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ViTMergeHandle",
    "bipartite_soft_matching",
    "max_merges",
    "merge_weighted",
    "patch_vit",
    "proportional_attention",
    "unpatch_vit",
]

MergeFn = Callable[..., torch.Tensor]

SUPPORTED = "patch_vit supports timm VisionTransformer and open_clip VisionTransformer"


# ----------------------------------------------------------------------------------------------------------------
# Pure tensor functions
# ----------------------------------------------------------------------------------------------------------------


def max_merges(num_tokens: int, protect_first: bool = True) -> int:
    """How many tokens one bipartite matching step can merge in a sequence of `num_tokens`.

    Set A holds the even positions (0, 2, ...) and set B the odd ones; every merged A token needs a B partner, so
    the bound is the number of A tokens that may merge (all but the protected first one) while B is not empty.
    """
    in_a = (num_tokens + 1) // 2
    in_b = num_tokens // 2
    if in_b == 0:
        return 0
    return in_a - 1 if protect_first else in_a


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protect_first: bool = True
) -> tuple[MergeFn, MergeFn]:
    """One ToMe matching step: merge the `r` A tokens that are most similar to some B token into that B token.

    Args:
        metric: (B, N, C) similarity features, for ToMe the keys averaged over heads. Rows are L2-normalised here
            (normalising already unit rows changes nothing), so dot products are cosine similarities.
        r: tokens to remove, 0 <= r <= `max_merges(N, protect_first)`.
        protect_first: never merge position 0 (the CLS token). Position 0 lies in A and only A tokens move, so
            excluding it from A's candidates is enough: nothing can merge into it either.

    Returns:
        `(merge_fn, unmerge_fn)`.
        `merge_fn(x, mode="mean")`: x (B, N, D) -> (B, N - r, D); each output token reduces ("mean" or "sum") the
            group of input tokens merged into it. The survivors (unmerged A tokens and all B tokens) keep their
            ORIGINAL ORDER (sorted by original index), not the reference implementation's A-then-B order.
        `unmerge_fn(y)`: y (B, N - r, D) -> (B, N, D); every original position receives its group's token.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    batch, num_tokens, _ = metric.shape
    limit = max_merges(num_tokens, protect_first)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= limit:
        raise ValueError(f"r={r!r} cannot be merged from {num_tokens} tokens; use an int in 0..{limit}")
    if r == 0:
        return _identity, _identity

    # The matching is a discrete choice: no gradient flows through it, only through the merged values.
    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)                     # (B, N, C), unit rows
        set_a, set_b = unit[:, 0::2], unit[:, 1::2]            # (B, Na, C), (B, Nb, C): even / odd positions
        scores = set_a @ set_b.transpose(1, 2)                 # (B, Na, Nb) cosine similarities
        if protect_first:
            scores[:, 0, :] = float("-inf")                    # the CLS row sorts last and is never chosen
        best_score, best_b = scores.max(dim=-1)                # (B, Na) each A token's best B partner
        # Stable, so that equal scores merge the earlier A token first (deterministic across runs).
        order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices  # (B, Na)
        merged_a = order[:, :r]                                 # (B, r) indices into A
        merged_pos = 2 * merged_a                               # (B, r) their original positions
        partner_pos = 2 * best_b.gather(1, merged_a) + 1        # (B, r) original positions of their B partners

        keep = torch.ones(batch, num_tokens, dtype=torch.bool, device=metric.device)  # (B, N)
        keep.scatter_(1, merged_pos, False)
        # Output slot of every kept token in original order; merged positions are overwritten just below.
        slot = keep.long().cumsum(dim=1) - 1                    # (B, N)
        destination = slot.scatter(1, merged_pos, slot.gather(1, partner_pos))  # (B, N) -> 0..N-r-1

    def merge_fn(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        if mode not in ("mean", "sum"):
            raise ValueError(f"merge mode must be 'mean' or 'sum', got {mode!r}")
        if x.shape[:2] != (batch, num_tokens):
            raise ValueError(f"merge_fn expects (B={batch}, N={num_tokens}, D), got shape {tuple(x.shape)}")
        index = destination.unsqueeze(-1).expand(-1, -1, x.shape[-1])   # (B, N, D) target slot per element
        out = x.new_zeros(batch, num_tokens - r, x.shape[-1])           # (B, N - r, D)
        return out.scatter_reduce(1, index, x, reduce=mode, include_self=False)

    def unmerge_fn(y: torch.Tensor) -> torch.Tensor:
        if y.shape[:2] != (batch, num_tokens - r):
            raise ValueError(f"unmerge_fn expects (B={batch}, N-r={num_tokens - r}, D), got {tuple(y.shape)}")
        index = destination.unsqueeze(-1).expand(-1, -1, y.shape[-1])   # (B, N, D) source slot per position
        return y.gather(1, index)                                         # (B, N, D)

    return merge_fn, unmerge_fn


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor | None, merge_fn: MergeFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens as size-weighted averages; the sizes of merged tokens add.

    Args:
        x: (B, N, D) tokens.
        size: (B, N, 1) patches each token stands for, or None for all ones (nothing merged yet).
        merge_fn: from `bipartite_soft_matching`, mapping (B, N, ·) -> (B, N', ·).

    Returns:
        x: (B, N', D) with every group's tokens averaged by their sizes (weights sum to one per group).
        size: (B, N', 1) the summed sizes; `size.sum(1)` stays N.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)                # (B, N, 1)
    weighted_sum = merge_fn(x * size, mode="sum")                  # (B, N', D)
    merged_size = merge_fn(size, mode="sum")                       # (B, N', 1)
    return weighted_sum / merged_size, merged_size


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + log(size) per key) v: a key of size s counts as s identical keys.

    Args:
        q, k, v: (B, H, N, head_dim).
        size: (B, N, 1) or None (all ones: plain attention, the same call as an unpatched model's).
        scale: logit scale, head_dim ** -0.5 when None.

    Returns:
        (B, H, N, head_dim).
    """
    bias = None
    if size is not None:
        batch, num_tokens = size.shape[0], size.shape[1]
        bias = size.log().to(q.dtype).reshape(batch, 1, 1, num_tokens)  # (B, 1, 1, N): per key, all heads/queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# The patch
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _MergeState:
    """What flows from block to block within one forward: sizes, and token counts for inspection."""

    size: torch.Tensor | None = None        # (B, N, 1), None until the first merge
    tokens_per_block: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.size = None
        self.tokens_per_block = []


@dataclass
class _Restore:
    """One instance attribute the patch set, and what `remove()` puts back."""

    module: nn.Module
    name: str
    had_own: bool           # whether the instance had its own attribute (else the class's method shows through)
    previous: Any = None


class _MergingBlockForward:
    """The `forward` set on one block instance: attention (proportional), merge, MLP.

    A callable object rather than a closure so that `patch_vit` can recognise its own patch on a block.
    """

    def __init__(self, block: nn.Module, index: int, r: int, clamp: bool, state: _MergeState, protect_first: bool,
                 family: str, handle: ViTMergeHandle):
        self.block, self.index, self.r, self.clamp, self.state = block, index, r, clamp, state
        self.protect_first, self.family, self.handle = protect_first, family, handle

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(a is not None and a is not False for a in args) or any(
            v is not None and v is not False for v in kwargs.values()
        ):
            raise ValueError(
                f"block {self.index} is token-merging and takes no attention mask or extra inputs; "
                "call patch_vit's handle.remove() to run the model with masks"
            )
        if self.index == 0:
            self.state.reset()  # a new forward starts at block 0: no sizes carried over from the last call
        if self.family == "open_clip" and not self.block.attn.batch_first:
            return self._run(x.transpose(0, 1)).transpose(0, 1)   # (N, B, D) -> (B, N, D) and back
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N - r, D)."""
        block = self.block
        if self.family == "timm":
            attended, keys = _timm_attention(block.attn, block.norm1(x), self.state.size)
            x = x + block.drop_path1(block.ls1(attended))
        else:
            attended, keys = _open_clip_attention(block.attn, block.ln_1(x), self.state.size)
            x = x + block.ls_1(attended)
        limit = max_merges(x.shape[1], self.protect_first)
        # An int r is clamped per block as in the paper (token counts depend on the image size at run time).
        r = min(self.r, limit) if self.clamp else self.r
        if r > limit:
            raise ValueError(f"block {self.index} gets {x.shape[1]} tokens and can merge at most {limit}, but r "
                             f"asks for {r}; use a smaller r or larger images")
        if r:
            merge_fn, _ = bipartite_soft_matching(keys.mean(dim=1), r, self.protect_first)  # metric (B, N, hd)
            x, self.state.size = merge_weighted(x, self.state.size, merge_fn)
        if self.family == "timm":
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        else:
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        self.state.tokens_per_block.append(x.shape[1])
        return x


def _timm_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention` with proportional attention. x: (B, N, D) -> output (B, N, D), keys (B, H, N, head_dim)."""
    batch, num_tokens, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    head_dim = attn.head_dim
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, head_dim)  # (B, N, 3, H, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                               # 3 × (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = proportional_attention(q, k, v, size, scale=attn.scale, dropout_p=dropout)  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(batch, num_tokens, attn.num_heads * head_dim)   # (B, N, H·hd)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k


def _open_clip_attention(
    mha: nn.MultiheadAttention, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nn.MultiheadAttention` self-attention, recomputed with proportional attention.

    x: (B, N, D) -> output (B, N, D), keys (B, H, N, head_dim).
    """
    batch, num_tokens, width = x.shape
    heads = mha.num_heads
    head_dim = width // heads
    # in_proj packs q, k, v along the output features: (B, N, 3·D) -> (B, N, 3, H, hd), heads contiguous as in MHA.
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).reshape(batch, num_tokens, 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                              # 3 × (B, H, N, hd)
    dropout = mha.dropout if mha.training else 0.0
    out = proportional_attention(q, k, v, size, scale=head_dim ** -0.5, dropout_p=dropout)  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(batch, num_tokens, width)                 # (B, N, D)
    return mha.out_proj(out), k


def _weighted_mean(tokens: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), size (B, N, 1) -> (B, D): the mean over the original patches the tokens stand for."""
    return (tokens * size).sum(dim=1) / size.sum(dim=1)


class _TimmPool:
    """`pool` for a timm ViT that average-pools: the size-weighted mean once tokens were merged."""

    def __init__(self, model: nn.Module, original: Callable, state: _MergeState):
        self.model, self.original, self.state = model, original, state

    def __call__(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.model.global_pool if pool_type is None else pool_type
        size = self.state.size
        if pool_type not in ("avg", "avgmax") or size is None:
            return self.original(x, pool_type)   # CLS and max pooling, or nothing merged: unchanged
        if size.shape[:2] != x.shape[:2]:
            raise ValueError(f"pool got {x.shape[1]} tokens but the last merged forward left {size.shape[1]}")
        start = 0 if getattr(self.model, "pool_include_prefix", False) else self.model.num_prefix_tokens
        tokens, weights = x[:, start:], size[:, start:]     # (B, N', D), (B, N', 1)
        mean = _weighted_mean(tokens, weights)              # (B, D)
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)


class _OpenClipPool:
    """`_global_pool` for an open_clip ViT with pool_type 'avg': the size-weighted mean of the patch tokens."""

    def __init__(self, model: nn.Module, original: Callable, state: _MergeState):
        self.model, self.original, self.state = model, original, state

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.state.size
        if self.model.pool_type != "avg" or size is None:
            return self.original(x)
        if size.shape[:2] != x.shape[:2]:
            raise ValueError(f"pool got {x.shape[1]} tokens but the last merged forward left {size.shape[1]}")
        return _weighted_mean(x[:, 1:], size[:, 1:]), x[:, 1:]   # (B, D), (B, N' - 1, D)


@dataclass(eq=False)
class ViTMergeHandle:
    """A live ToMe patch on one ViT. `remove()` (or leaving the `with` block) restores the model exactly.

    Attributes:
        model: the patched VisionTransformer (for a CLIP model, its `.visual`).
        family: "timm" or "open_clip".
        r: tokens merged by each block at the configured image size (an int r clamped per block, as in the paper).
        num_tokens: tokens entering block 0 at the model's configured image size (CLS included).
    """

    model: nn.Module
    family: str
    r: tuple[int, ...]
    num_tokens: int
    _state: _MergeState = field(default_factory=_MergeState, repr=False)
    _restores: list[_Restore] = field(default_factory=list, repr=False)
    active: bool = False

    @property
    def tokens_per_block(self) -> list[int]:
        """Tokens leaving each block in the last forward: N - cumulative r."""
        return list(self._state.tokens_per_block)

    @property
    def last_size(self) -> torch.Tensor | None:
        """(B, N', 1) patches per output token of the last forward (None if nothing merged)."""
        return self._state.size

    def remove(self) -> nn.Module:
        """Put back every attribute the patch set; returns the model. Calling it twice is harmless."""
        for restore in reversed(self._restores):
            if restore.had_own:
                setattr(restore.module, restore.name, restore.previous)
            else:
                delattr(restore.module, restore.name)
        self._restores = []
        self.active = False   # tokens_per_block and last_size still describe the last patched forward
        return self.model

    def __enter__(self) -> ViTMergeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True)
class _Target:
    """A validated ViT: what to patch and how."""

    model: nn.Module
    family: str
    blocks: tuple[nn.Module, ...]
    num_tokens: int
    protect_first: bool
    pool_attr: str              # the model's pooling method; replaced always, since pool settings may change later


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unsupported(model: nn.Module, why: str) -> TypeError:
    return TypeError(f"{SUPPORTED}, got {_class_name(model)}; {why}")


def _resolve(model: nn.Module) -> _Target:
    """Find the ViT to patch and check every assumption before anything is changed."""
    # Look the classes up in sys.modules: a model of these libraries implies they are imported, and this keeps
    # `import mmreduce` free of timm and open_clip.
    timm_vit = sys.modules.get("timm.models.vision_transformer")
    clip_tf = sys.modules.get("open_clip.transformer")
    visual = getattr(model, "visual", None)
    if clip_tf is not None and not isinstance(model, clip_tf.VisionTransformer) and isinstance(
        visual, clip_tf.VisionTransformer
    ):
        model = visual  # a whole CLIP model: its image tower
    if timm_vit is not None and isinstance(model, timm_vit.VisionTransformer):
        return _resolve_timm(model, timm_vit)
    if clip_tf is not None and isinstance(model, clip_tf.VisionTransformer):
        return _resolve_open_clip(model, clip_tf)
    raise _unsupported(model, "pass a timm VisionTransformer, an open_clip VisionTransformer or a CLIP model "
                              "whose .visual is one")


def _resolve_timm(model: nn.Module, timm_vit: Any) -> _Target:
    blocks = tuple(model.blocks)
    attention_cls = timm_vit.Attention
    for i, block in enumerate(blocks):
        if type(block) is not timm_vit.Block or type(block.attn) is not attention_cls:
            raise _unsupported(model, f"block {i} is {_class_name(block)} with attention "
                                      f"{_class_name(getattr(block, 'attn', None))}, not timm's Block/Attention")
    if model.num_prefix_tokens > 1:
        raise ValueError(f"the timm ViT has {model.num_prefix_tokens} prefix tokens (register or distillation "
                         "tokens); patch_vit protects only a CLS token: use a ViT without reg_tokens")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("the timm ViT pools with attention ('map'), which would need proportional attention too; "
                         "use a ViT with global_pool='token' or 'avg'")
    patch_embed = getattr(model, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if num_patches is None:
        raise _unsupported(model, "its patch_embed has no num_patches")
    if not callable(getattr(model, "pool", None)):
        raise _unsupported(model, "it has no pool() method (timm < 1.0)")
    return _Target(model, "timm", blocks, num_patches + model.num_prefix_tokens,
                   protect_first=model.num_prefix_tokens == 1, pool_attr="pool")


def _resolve_open_clip(model: nn.Module, clip_tf: Any) -> _Target:
    blocks = tuple(model.transformer.resblocks)
    for i, block in enumerate(blocks):
        mha = getattr(block, "attn", None)
        if type(block) is not clip_tf.ResidualAttentionBlock or not isinstance(mha, nn.MultiheadAttention):
            raise _unsupported(model, f"block {i} is {_class_name(block)}, not open_clip's ResidualAttentionBlock "
                                      "with nn.MultiheadAttention")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise _unsupported(model, f"block {i}'s attention has separate q/k/v widths, bias_k or add_zero_attn")
        if hasattr(block, "ln_1_kv"):
            raise _unsupported(model, f"block {i} is a cross-attention block")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("the open_clip ViT pools with an attentional pooler, which would need proportional "
                         "attention too; use a ViT with pool_type 'tok' or 'avg'")
    grid = model.grid_size
    return _Target(model, "open_clip", blocks, grid[0] * grid[1] + 1, protect_first=True, pool_attr="_global_pool")


def _validate_r(r: int | Sequence[int], target: _Target) -> tuple[int, ...]:
    """The per-block schedule at the model's configured image size.

    An int r follows the paper: every block merges min(r, what it can merge), so r=16 on a ViT-B/16 merges 16 in
    blocks 0-10 and 10 in block 11 (21 tokens left). A list is an explicit schedule and must fit exactly.
    """
    depth = len(target.blocks)
    if isinstance(r, bool) or not isinstance(r, (int, list, tuple)):
        # A ValueError like every other bad r, so that callers catch one type.
        message = f"r must be an int or a list of {depth} ints (one per block), got {type(r).__name__}"
        raise ValueError(message)  # noqa: TRY004
    if isinstance(r, int):
        if r < 0:
            raise ValueError(f"r={r} is not an int >= 0; give the tokens each block merges")
        schedule, tokens = [], target.num_tokens
        for _ in range(depth):
            schedule.append(min(r, max_merges(tokens, target.protect_first)))
            tokens -= schedule[-1]
        return tuple(schedule)
    per_block = list(r)
    if len(per_block) != depth:
        raise ValueError(f"r has {len(per_block)} entries but the model has {depth} blocks; give one per block")
    for i, value in enumerate(per_block):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"r[{i}]={value!r} is not an int >= 0; give each block a non-negative token count")
    patches = target.num_tokens - 1 if target.protect_first else target.num_tokens
    if sum(per_block) > patches - 1:
        besides = " besides CLS" if target.protect_first else ""
        raise ValueError(f"r merges {sum(per_block)} tokens in total but the model has {patches} patch tokens; "
                         f"lower r so that at least one token{besides} remains")
    tokens = target.num_tokens
    for i, value in enumerate(per_block):
        limit = max_merges(tokens, target.protect_first)
        if value > limit:
            raise ValueError(f"r[{i}]={value} but block {i} gets {tokens} tokens and can merge at most {limit} "
                             "(each merged token needs a partner in the other half); lower r at that block")
        tokens -= value
    return tuple(per_block)


def _find_handle(blocks: Sequence[nn.Module]) -> ViTMergeHandle | None:
    for block in blocks:
        own = block.__dict__.get("forward")
        if isinstance(own, _MergingBlockForward):
            return own.handle
    return None


def patch_vit(model: nn.Module, r: int | Sequence[int]) -> ViTMergeHandle:
    """Make every block of a timm or open_clip ViT merge `r` tokens (ToMe) until `handle.remove()`.

    Args:
        model: a timm `VisionTransformer`, an open_clip `VisionTransformer`, or a CLIP model whose `.visual` is one.
        r: tokens merged by every block (int; a block that cannot merge that many merges all it can, as in the
            paper), or one int per block (an exact schedule: a block that cannot merge its count is an error).

    Returns:
        A `ViTMergeHandle`; also a context manager that removes the patch on exit.

    Raises:
        TypeError: not a supported ViT (nothing is changed).
        ValueError: bad `r`, a model already patched, or an unsupported pooling / prefix-token setup.
    """
    target = _resolve(model)
    existing = _find_handle(target.blocks)
    if existing is not None:
        raise ValueError(f"this {target.family} ViT is already patched by patch_vit (r={list(existing.r)}); "
                         "call handle.remove() or unpatch_vit(model) first")
    per_block = _validate_r(r, target)
    clamp = isinstance(r, int)
    requested = [r] * len(target.blocks) if clamp else per_block

    handle = ViTMergeHandle(target.model, target.family, per_block, target.num_tokens)
    state = handle._state
    planned: list[tuple[nn.Module, str, Any]] = [
        (block, "forward", _MergingBlockForward(block, i, requested[i], clamp, state, target.protect_first,
                                                target.family, handle))
        for i, block in enumerate(target.blocks)
    ]
    pool_cls = _TimmPool if target.family == "timm" else _OpenClipPool
    original_pool = getattr(target.model, target.pool_attr)
    planned.append((target.model, target.pool_attr, pool_cls(target.model, original_pool, state)))
    try:
        for module, name, replacement in planned:
            had_own = name in module.__dict__
            handle._restores.append(_Restore(module, name, had_own, module.__dict__.get(name)))
            setattr(module, name, replacement)
    except BaseException:
        handle.remove()  # never leave a half-applied patch
        raise
    handle.active = True
    return handle


def unpatch_vit(model: nn.Module) -> nn.Module:
    """Remove `patch_vit` from a model (or its CLIP `.visual`); returns the patched ViT."""
    target = _resolve(model)
    handle = _find_handle(target.blocks)
    if handle is None:
        raise ValueError(f"this {target.family} ViT is not patched by patch_vit")
    return handle.remove()
