"""The hook engine: physically drops vision tokens inside the LLM of a stock Hugging Face VLM.

Data flow of one prefill (ARCHITECTURE §2):
  1. a pre-hook on the adapter's multimodal module reads `input_ids` and marks the vision tokens;
  2. a pre-hook on the text model starts a run (prefill) or looks up what was dropped for this cache (decode);
  3. pre-hooks on the decoder layers score at each stage's scoring layer and, from each stage's apply layer on,
     hand the layer a shorter stream: hidden states gathered, RoPE gathered at the kept tokens' original positions,
     the causal mask rebuilt for that layer's cache length (`create_causal_mask(..., layer_idx=l)`);
  4. a forward hook on the text model scatters the last hidden state back to prompt length (dropped positions
     hold zeros), remembers per cache what each layer kept, and finishes the stats.
Decode steps drop nothing; the mask of every shortened layer group is rebuilt at every step for its cache length.

Rows of a batch may keep different numbers of tokens; shorter rows are left-filled with masked filler slots, just
as left padding is, so a padded batch computes exactly what each sample computes alone.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .before_llm import POSITION_MODES, BeforeRecord, TowerProbe, plan_batch, rewrite_decode, rewrite_prefill, \
    token_signals
from .flops import ModelDims
from .methods.base import DropStage, ReductionMethod, ScoreContext, top_k_sorted
from .stats import ReductionStats

__all__ = ["LayerPrefix", "Reducer", "SUPPORTED_ATTENTION"]

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class _Group:
    """Layers [start, next group's start) share one stream: `original_index`/`valid` are (B, T_g)."""

    start: int
    original_index: torch.Tensor
    valid: torch.Tensor


@dataclass
class _CacheRecord:
    """What the prefill of one cache dropped, so decode steps can size each layer group's mask."""

    prefill_length: int
    groups: list[_Group]
    before: BeforeRecord | None = None


@dataclass
class _PrefillRun:
    batch: int
    length: int
    input_mask: torch.Tensor  # (B, T) bool, the 2-D attention mask of the prompt
    initial_vision: torch.Tensor  # (B,) long
    query_original: torch.Tensor  # (B,) original index of the last prompt token
    pad_offset: torch.Tensor  # (B,) index of each sample's first real token
    sample_seed: torch.Tensor  # (B,) long
    cache: Cache | None
    index: torch.Tensor  # (B, T_cur) original index of each stream token
    valid: torch.Tensor  # (B, T_cur) bool
    vision: torch.Tensor  # (B, T_cur) bool
    full_kwargs: dict | None = None
    group_kwargs: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)  # apply layer -> (gather (B, T_new), new_valid (B, T_new))
    groups: list[_Group] = field(default_factory=list)
    counts: list[torch.Tensor] = field(default_factory=list)  # per layer, (B,) vision tokens entering it
    kept_positions: dict = field(default_factory=dict)
    selection_s: float = 0.0
    before: BeforeRecord | None = None

    def caller_positions(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) positions in this run's prompt -> positions in the prompt the caller's forward produced."""
        return index if self.before is None else self.before.to_caller(index)

    def query_index(self) -> torch.Tensor:
        """(B,) position of the last prompt token in the current stream (it is never dropped)."""
        return ((self.index == self.query_original[:, None]) & self.valid).float().argmax(dim=1)


@dataclass
class _DecodeRun:
    record: _CacheRecord
    attention_mask: torch.Tensor | None  # (B, S_total) 2-D mask of the decode call
    cache: Cache
    group_mask: object = None


@dataclass
class LayerPrefix:
    """The input of decoder layer `layer` for one prefill batch, as a (possibly reduced) prefill reached it.

    Made by `Reducer.capture` and consumed by `Reducer.resume`, so that a search over what happens from `layer` on
    runs the layers before it once (G-Search). Attributes:
        layer: the decoder layer whose input this is.
        args, kwargs: that layer's call arguments (`args[0]` or `kwargs["hidden_states"]`: (B, T_l, D)).
        query_index: (B,) position of the last prompt token in that stream.
    """

    layer: int
    args: tuple
    kwargs: dict
    query_index: torch.Tensor
    _state: "_PrefillRun | None" = None

    @property
    def hidden_states(self) -> torch.Tensor:
        """(B, T_l, D) the stream entering `layer`."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]


class _StopForward(Exception):
    """Raised by the capture hook: the layers after the captured one are not needed."""


class Reducer:
    """Installs the hooks of one (model, method) pair; `remove()` takes every one of them away again."""

    def __init__(self, model: nn.Module, method: ReductionMethod, adapter, positions: str = "original"):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.model, self.method, self.adapter = model, method, adapter
        self.positions = positions
        self.before = method.before_stage()
        requests = self.before.signal_requests() if self.before is not None else []
        self._tower_probe = TowerProbe(adapter, requests) if requests else None
        self._call_inputs: dict = {}
        self.layers = adapter.decoder_layers()
        self.num_layers = len(self.layers)
        self.stages: list[DropStage] = method.check_stages(self.num_layers)
        self._score_at = {stage.score_layer: stage for stage in self.stages}
        self._apply_at = {stage.apply_layer: stage for stage in self.stages}
        self._first_apply = min(self._apply_at) if self._apply_at else None
        self._dims = ModelDims.from_config(adapter.text_config)
        self._handles: list = []
        self._pending_input: tuple | None = None
        self._run: _PrefillRun | _DecodeRun | None = None
        self._records: "weakref.WeakKeyDictionary[Cache, _CacheRecord]" = weakref.WeakKeyDictionary()
        self._vision_s = self._vision_t0 = 0.0
        self._t0 = 0.0
        self._phase = "prefill"
        # Inside ReducedModel.generate: the prompt's length as the text model sees it (placeholders expanded),
        # taken from its first prefill, so the query stays the last prompt token at every step.
        self.generating = False
        self.prompt_length: int | None = None
        self._prompt_ids_length: int | None = None  # ...and as the multimodal module saw it (before expansion)
        self.stats = ReductionStats(method=method.describe(), num_layers=self.num_layers, note="not run yet")

    # ---- install / remove -------------------------------------------------------------------------------------
    def install(self) -> None:
        check_attention(self.adapter.text_config)
        try:
            add = self._handles.append
            add(self.adapter.multimodal_model.register_forward_pre_hook(self._on_multimodal, with_kwargs=True))
            add(self.adapter.text_model.register_forward_pre_hook(self._on_text_start, with_kwargs=True))
            add(self.adapter.text_model.register_forward_hook(self._on_text_end, with_kwargs=True))
            for layer_idx, layer in enumerate(self.layers):
                add(layer.register_forward_pre_hook(self._layer_hook(layer_idx, layer), with_kwargs=True))
            tower = self.adapter.vision_tower
            if tower is not None:
                add(tower.register_forward_pre_hook(self._on_vision_start))
                add(tower.register_forward_hook(self._on_vision_end))
            if self._tower_probe is not None:
                self._tower_probe.install()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        if self._tower_probe is not None:
            self._tower_probe.remove()
        self._run = None
        self._pending_input = None
        self._call_inputs = {}

    @property
    def reduces(self) -> bool:
        """Whether the method changes anything (drop stages inside the LLM or a before-the-LLM stage)."""
        return bool(self.stages) or self.before is not None

    def note_call(self, inputs: dict) -> None:
        """The caller's keyword inputs of a forward or generate() (processor outputs): where the token layout of a
        before-the-LLM method comes from, since generate() pops the pixel inputs before the first forward."""
        self._call_inputs = {key: value for key, value in inputs.items() if value is not None}

    def start_generate(self) -> None:
        """Called by `ReducedModel.generate` before it runs: the next prefill fixes the prompt length."""
        self.generating, self.prompt_length, self._prompt_ids_length = True, None, None

    def end_generate(self) -> None:
        self.generating, self.prompt_length, self._prompt_ids_length = False, None, None

    # ---- prefix reuse -----------------------------------------------------------------------------------------
    def capture(self, prefill: Callable[[], Any], layer: int) -> LayerPrefix:
        """Runs `prefill()` (one prefill forward of the hooked model) up to the input of decoder layer `layer`,
        stops there, and returns that input with the engine's state (what was dropped before `layer`)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        captured: list[LayerPrefix] = []

        def grab(module, args, kwargs):
            # Prepended: runs before this layer's own engine hook, so nothing of `layer` is applied yet.
            run = self._run if isinstance(self._run, _PrefillRun) else None
            hidden = args[0] if args else kwargs["hidden_states"]
            query = run.query_index() if run is not None else _last_position(hidden)
            captured.append(LayerPrefix(layer, args, dict(kwargs), query, _copy_run(run)))
            raise _StopForward

        handle = self.layers[layer].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        try:
            prefill()
        except _StopForward:
            pass
        finally:
            handle.remove()
            self._run = None
        if not captured:
            raise RuntimeError(f"the prefill never reached decoder layer {layer}")
        return captured[0]

    def resume(self, prefix: LayerPrefix) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs decoder layers >= `prefix.layer` under this reducer's method, from a captured prefix.

        The method must keep what the captured prefill kept before `prefix.layer` (a search changes only the
        layers from there on). Returns ((B, T_last, D) output of the last decoder layer, (B,) position of the last
        prompt token in it).
        """
        self._run = _copy_run(prefix._state)
        self._phase = "prefill"
        hidden = prefix.hidden_states
        kwargs = {k: v for k, v in prefix.kwargs.items() if k != "hidden_states"}
        try:
            for module in self.layers[prefix.layer:]:
                hidden = module(hidden, *prefix.args[1:], **kwargs)
            run = self._run
            query = run.query_index() if isinstance(run, _PrefillRun) else prefix.query_index
        finally:
            self._run = None
        return hidden, query

    # ---- hooks ------------------------------------------------------------------------------------------------
    def _on_multimodal(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not self.generating:  # a plain forward: its own kwargs describe its images (none: no stale layout)
            # generate() encodes the images first and then passes pixel_values=None: no pixels, no layout.
            pixels = any(key.startswith("pixel_values") and value is not None for key, value in kwargs.items())
            self._call_inputs = {key: value for key, value in kwargs.items() if value is not None} if pixels else {}
        vision = self.adapter.vision_mask(input_ids=input_ids, inputs_embeds=kwargs.get("inputs_embeds"))
        self._pending_input = (vision, input_ids, kwargs.get("attention_mask"))

    def _on_vision_start(self, module, args):
        self._vision_t0 = self._now(module)

    def _on_vision_end(self, module, args, output):
        self._vision_s += self._now(module) - self._vision_t0

    def _on_text_start(self, module, args, kwargs):
        pending, self._pending_input = self._pending_input, None
        self._run = None
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        reference = embeds if embeds is not None else ids
        self._phase = "prefill"
        if reference is None:
            return
        batch, length = reference.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        attention_mask = kwargs.get("attention_mask")
        past = cache.get_seq_length(0) if cache is not None else 0
        self._t0 = self._now(reference)
        if self.generating and past == 0 and self.prompt_length is None:
            self.prompt_length = length
            self._prompt_ids_length = pending[1].shape[1] if pending is not None and pending[1] is not None else None
        # A cache-free generate() recomputes the whole sequence each step: reduce it again, but count it as decode.
        recompute = past == 0 and self.prompt_length is not None and length > self.prompt_length
        self._phase = "decode" if past > 0 or recompute else "prefill"
        if past > 0:
            record = self._records.get(cache)
            vision_now = pending[0] if pending is not None else None
            if self.reduces and vision_now is not None and bool(vision_now.any()):
                raise ValueError(
                    "vision tokens arrived in a forward that continues a cache (a prefill split over several "
                    "forwards, e.g. prefill chunking, or a new image in a later turn); mmreduce reduces one whole "
                    "prefill at a time: send the prompt in one forward (prefill_chunk_size=None) or start a new cache"
                )
            if record is None:
                return None
            check_dynamic_cache(cache)
            if record.before is not None:
                kwargs = rewrite_decode(kwargs, record.before, past)
                attention_mask = kwargs.get("attention_mask")
            if record.groups:
                full_mask = _as_2d_mask(attention_mask, batch, past + length, reference.device)
                self._run = _DecodeRun(record, full_mask, cache)
            return (args, kwargs) if record.before is not None else None
        vision = pending[0] if pending is not None else None
        if vision is not None and tuple(vision.shape) != (batch, length):
            vision = None  # the text model was called with other inputs than the multimodal module saw
        from_text = self.adapter.text_vision_mask(kwargs)  # families that expand placeholders before the LLM
        if from_text is not None:
            vision = from_text.to(torch.bool)
        stats = ReductionStats(method=self.method.describe(), num_layers=self.num_layers, dims=self._dims)
        stats.vision_ms, self._vision_s = self._vision_s * 1e3, 0.0
        if not recompute:
            self.stats = stats
        input_mask = _as_2d_mask(attention_mask, batch, length, reference.device)
        vision = (vision if vision is not None else torch.zeros(batch, length, dtype=torch.bool)).to(reference.device)
        vision = vision & input_mask
        initial = vision.sum(dim=1)
        stats.initial_vision_tokens = initial.tolist()
        stats.vision_positions = [row.nonzero().flatten().tolist() for row in vision]
        stats.text_tokens = (input_mask & ~vision).sum(dim=1).tolist()
        stats.vision_tokens_per_layer = [[n] * self.num_layers for n in initial.tolist()]
        if from_text is None and (pending is None or pending[0] is None):
            stats.note = "vision tokens unknown (no input_ids or inputs_embeds reached the multimodal module)"
            return
        if not bool(initial.any()):
            stats.note = "no image tokens in the prompt: ran unreduced"
            return
        check_dynamic_cache(cache)
        positions = torch.arange(length, device=reference.device)
        last_valid = torch.where(input_mask, positions, -1).max(dim=1).values
        if self.prompt_length is not None and length >= self.prompt_length:
            query = torch.full_like(last_valid, self.prompt_length - 1)
        else:
            query = last_valid
        seeds = _sample_seeds(*(pending[1:] if pending is not None else (None, None)), input_mask, query,
                              self._prompt_ids_length if self.prompt_length is not None else None)
        before = None
        if self.before is not None:
            if embeds is None:
                raise ValueError("a before-the-LLM method needs the text model to receive inputs_embeds (the "
                                 "family's merged image features); it got input_ids only")
            start = self._now(embeds)
            kwargs, before, vision, input_mask, extra = self._reduce_before(kwargs, embeds, vision, input_mask, seeds,
                                                                            query)
            stats.extra_flops = extra
            if before is not None:
                stats.kept_positions[0] = [row[vis].tolist() for row, vis in zip(before.gather, vision)]
                length = before.new_length
                positions = torch.arange(length, device=reference.device)
                query = (before.gather == query[:, None]).float().argmax(dim=1)
            stats.selection_ms = (self._now(embeds) - start) * 1e3
        initial = vision.sum(dim=1)
        stats.vision_tokens_per_layer = [[n] * self.num_layers for n in initial.tolist()]
        self.method.check_inputs(initial)
        self._run = _PrefillRun(
            batch=batch,
            length=length,
            input_mask=input_mask,
            initial_vision=initial,
            query_original=query,
            pad_offset=input_mask.float().argmax(dim=1),
            sample_seed=seeds,
            cache=cache,
            index=positions.expand(batch, -1),
            valid=input_mask,
            vision=vision,
            before=before,
            kept_positions=dict(stats.kept_positions),
            selection_s=stats.selection_ms / 1e3,
        )
        if before is not None:
            return args, kwargs
        return None

    def _layer_hook(self, layer_idx: int, layer: nn.Module):
        def hook(module, args, kwargs):
            run = self._run
            if isinstance(run, _PrefillRun):
                return self._prefill_layer(run, layer_idx, layer, args, kwargs)
            if isinstance(run, _DecodeRun) and layer_idx >= run.record.groups[0].start:
                return self._decode_layer(run, layer_idx, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, run: _PrefillRun, layer_idx: int, layer: nn.Module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if run.full_kwargs is None:
            names = ("position_embeddings", "position_ids", *self.adapter.per_token_layer_kwargs)
            run.full_kwargs = {key: kwargs.get(key) for key in names}
        applying = self._apply_at.get(layer_idx)
        # A drop ranked at an earlier layer takes effect first, so a stage ranked here sees the stream this layer
        # will actually compute; a stage ranked and applied here drops right after its ranking.
        if applying is not None and applying.score_layer < layer_idx:
            hidden = self._apply(run, layer_idx, hidden)
        if layer_idx in self._score_at:
            # The stream may already be shorter than the stock kwargs: score with the stream's own RoPE.
            stream_kwargs = {**kwargs, **run.group_kwargs}
            self._select(run, self._score_at[layer_idx], layer_idx, layer, hidden, stream_kwargs)
        if applying is not None and applying.score_layer == layer_idx:
            hidden = self._apply(run, layer_idx, hidden)
        run.counts.append((run.vision & run.valid).sum(dim=1))
        if self._first_apply is None or layer_idx < self._first_apply:
            return None
        kwargs.update(run.group_kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _select(self, run: _PrefillRun, stage: DropStage, layer_idx: int, layer, hidden, layer_kwargs) -> None:
        """Ranks the surviving vision tokens at the input of `layer_idx`; the drop waits for the apply layer."""
        start = self._now(hidden)
        query_index = run.query_index()
        rows = torch.arange(run.batch, device=hidden.device)
        is_query = torch.zeros_like(run.valid)
        is_query[rows, query_index] = True
        context = ScoreContext(
            layer_idx=layer_idx,
            layer=layer,
            hidden=hidden,
            vision=run.vision & run.valid,
            key_valid=run.valid,
            query_index=query_index,
            position_embeddings=layer_kwargs.get("position_embeddings"),
            original_index=run.index,
            relative_position=run.index - run.pad_offset[:, None],
            sample_seed=run.sample_seed,
            adapter=self.adapter,
            layer_kwargs=layer_kwargs,
        )
        with torch.no_grad():
            scores = self.method.score(context)  # (B, T_cur)
        surviving = context.vision.sum(dim=1)
        wanted = stage.keep_counts(surviving, run.initial_vision)
        # The query itself is never dropped, even when the prompt ends on a vision token.
        forced = context.vision & is_query
        candidates = context.vision & ~is_query
        kept_vision = top_k_sorted(scores, candidates, (wanted - forced.sum(dim=1)).clamp(min=0)) | forced
        if bool((kept_vision == context.vision).all()):
            run.pending[stage.apply_layer] = None  # nothing to drop: leave the stream (and its padding) untouched
        else:
            keep = (run.valid & ~run.vision) | kept_vision
            run.pending[stage.apply_layer] = _compact(keep)
        run.selection_s += self._now(hidden) - start

    def _apply(self, run: _PrefillRun, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        selection = run.pending.pop(layer_idx)
        if selection is None:
            return hidden
        start = self._now(hidden)
        gather, new_valid = selection  # (B, T_new) each
        hidden = _gather_rows(hidden, gather)  # (B, T_cur, D) -> (B, T_new, D)
        run.index = run.index.gather(1, gather)
        run.vision = run.vision.gather(1, gather) & new_valid
        run.valid = new_valid
        run.group_kwargs = self.adapter.gather_layer_kwargs(run.full_kwargs, run.index)
        run.group_kwargs["attention_mask"] = self._layer_mask(layer_idx, hidden, new_valid, run.cache)
        run.groups.append(_Group(layer_idx, run.index, new_valid))
        caller_index = run.caller_positions(run.index)
        run.kept_positions[layer_idx] = [
            caller_index[row][run.vision[row]].tolist() for row in range(run.batch)
        ]
        run.selection_s += self._now(hidden) - start
        return hidden

    def _decode_layer(self, run: _DecodeRun, layer_idx: int, args, kwargs):
        group = next((g for g in run.record.groups if g.start == layer_idx), None)
        if group is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            new_tokens = run.attention_mask[:, run.record.prefill_length :]  # (B, S_total - T)
            mask_2d = torch.cat([group.valid.to(new_tokens.device), new_tokens], dim=1)
            expected = run.cache.get_seq_length(layer_idx) + hidden.shape[1]
            if mask_2d.shape[1] != expected or mask_2d.shape[0] != hidden.shape[0]:
                raise RuntimeError(
                    f"mmreduce: layer {layer_idx} holds {run.cache.get_seq_length(layer_idx)} cached tokens, but the "
                    f"prefill kept {group.valid.shape[1]} and {new_tokens.shape[1]} were added since (batch "
                    f"{group.valid.shape[0]} vs {hidden.shape[0]}); the cache was edited outside mmreduce"
                )
            run.group_mask = self._layer_mask(layer_idx, hidden, mask_2d, run.cache)
        kwargs["attention_mask"] = run.group_mask
        return args, kwargs

    def _on_text_end(self, module, args, kwargs, output):
        run, self._run = self._run, None
        elapsed_ms = (self._now(getattr(output, "last_hidden_state", None)) - self._t0) * 1e3
        if self._phase == "decode":
            self.stats.decode_ms += elapsed_ms
            self.stats.decode_steps += 1
        else:
            self.stats.prefill_ms = elapsed_ms
        if not isinstance(run, _PrefillRun):
            return None
        if self._phase == "prefill":
            stats = self.stats
            stats.reduced = bool(run.groups) or bool(run.before is not None and run.before.removed.any())
            stats.note = "" if stats.reduced else (
                "the method drops nothing" if not self.stages and self.before is None else "nothing dropped")
            stats.vision_tokens_per_layer = torch.stack(run.counts, dim=1).tolist()  # (B, L)
            stats.kept_positions = run.kept_positions
            stats.selection_ms = run.selection_s * 1e3
        if run.cache is not None and (run.groups or run.before is not None):
            self._records[run.cache] = _CacheRecord(run.length, run.groups, run.before)
        if not run.groups and run.before is None:
            return None
        last = output.last_hidden_state  # (B, T_last, D)
        if run.groups:
            full = last.new_zeros(run.batch, run.length, last.shape[-1])  # (B, T', D)
            rows = torch.arange(run.batch, device=last.device)[:, None].expand_as(run.index)
            full[rows[run.valid], run.index[run.valid]] = last[run.valid]
            last = full
        if run.before is not None:
            # Back to the caller's prompt length: logits line up with the caller's input_ids (dropped = zeros).
            before = run.before
            full = last.new_zeros(run.batch, before.length + last.shape[1] - before.new_length, last.shape[-1])
            rows = torch.arange(run.batch, device=last.device)[:, None].expand_as(before.gather)
            full[rows[before.valid], before.gather[before.valid]] = last[:, :before.new_length][before.valid]
            full[:, before.length:] = last[:, before.new_length:]
            last = full
        output.last_hidden_state = last
        return output

    def _reduce_before(self, kwargs: dict, embeds: torch.Tensor, vision: torch.Tensor, input_mask: torch.Tensor,
                       seeds: torch.Tensor, query: torch.Tensor):
        """Runs the before-the-LLM method on a prefill (`query`: (B,) position of the last prompt token); returns
        the text model's new kwargs, the record, the (B, T') vision and prompt masks of the shortened prompt, and the
        method's extra FLOPs per sample."""
        batch = embeds.shape[0]
        cells = signals = None
        if self.before.needs_layout or self._tower_probe is not None:
            cells_all, grids = self._layout()
            rows = _row_slices(vision.sum(dim=1).tolist(), batch, len(cells_all))
            cells = [cells_all[row] for row in rows]
            if self._tower_probe is not None:
                per_token = token_signals(self._tower_probe, self.adapter, cells_all, grids)
                signals = [{key: value[row] for key, value in per_token.items()} for row in rows]
        keep, merged, extra = plan_batch(self.before, embeds, vision, cells, signals or {}, seeds)
        # The last prompt token is the query whose output the caller reads (generate() takes its logits): when a
        # prompt ends on a vision token, it stays with its own features, as the in-LLM stages never drop it either.
        rows = torch.arange(batch, device=keep.device)
        keep[rows, query] |= vision[rows, query]
        if torch.equal(keep, vision) and torch.equal(merged, embeds):
            return kwargs, None, vision, input_mask, extra  # keeps everything: the stock prompt, untouched
        keep_all = (input_mask & ~vision) | keep
        gather, valid = _compact(keep_all)
        new_kwargs, record = rewrite_prefill(kwargs, merged, keep_all, gather, valid, input_mask, self.positions,
                                             self.adapter.per_token_layer_kwargs)
        new_vision = vision.gather(1, gather) & valid
        return new_kwargs, record, new_vision, valid, extra

    def _layout(self):
        """(cells, grids) of every vision token of the caller's batch, from the caller's processor outputs."""
        if not self._call_inputs:
            raise ValueError(f"{self.before.name} needs the token layout of the images (crops, tiles, frames), "
                             "which comes from the processor outputs: call the ReducedModel that wrap() returned "
                             "(its generate() or forward) with them")
        return self.adapter.batch_token_layout(self._call_inputs)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _layer_mask(self, layer_idx: int, hidden: torch.Tensor, mask_2d: torch.Tensor, cache: Cache | None):
        config = self.adapter.text_config
        layer_types = getattr(config, "layer_types", None)
        build = create_causal_mask
        if layer_types is not None and layer_types[layer_idx] == "sliding_attention":
            build = create_sliding_window_causal_mask
        # position_ids=None on purpose: gapped positions would read as packed sequences.
        return build(
            config=config,
            inputs_embeds=hidden,
            attention_mask=mask_2d.to(hidden.device),
            cache=cache,
            position_ids=None,
            layer_idx=layer_idx,
        )

    @staticmethod
    def _now(reference) -> float:
        device = getattr(reference, "device", None)
        if device is None and isinstance(reference, nn.Module):
            param = next(reference.parameters(), None)
            device = param.device if param is not None else None
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()


def check_attention(config) -> None:
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by mmreduce (per-layer masks are "
            f"rebuilt for {SUPPORTED_ATTENTION}); switch with model.set_attn_implementation('sdpa')"
        )


def check_dynamic_cache(cache) -> None:
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, Cache) or layers is None or not all(isinstance(layer, DynamicLayer) for layer in layers):
        raise ValueError(
            f"mmreduce needs a DynamicCache (each layer keeps its own length), got {type(cache).__name__}; "
            "StaticCache and compiled caches cannot hold per-layer lengths: drop cache_implementation='static'"
        )


def _as_2d_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(B, length) bool 2-D mask on `device`; all ones when none was given."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"mmreduce needs the 2-D attention mask (B, T) to rebuild per-layer masks, got shape "
            f"{tuple(attention_mask.shape)}; prepared 4-D masks (StaticCache, custom masks) are not supported"
        )
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, length)}")
    return attention_mask.to(device=device, dtype=torch.bool)


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned compaction of each row's kept positions, left-filled with masked filler slots.

    Args:
        keep: (B, T) bool.

    Returns:
        gather: (B, T_new) indices into the row (filler slots repeat the row's first kept index),
        valid: (B, T_new) bool, False on filler slots; T_new = the largest kept count.
    """
    counts = keep.sum(dim=1)  # (B,)
    new_length = int(counts.max())
    kept_first = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_length]  # (B, T_new)
    slot = torch.arange(new_length, device=keep.device)[None, :] - (new_length - counts)[:, None]  # (B, T_new)
    valid = slot >= 0
    gather = kept_first.gather(1, slot.clamp(min=0))
    return gather, valid


def _copy_run(run: _PrefillRun | None) -> _PrefillRun | None:
    """A copy of a prefill state whose containers can grow independently (its tensors are never mutated)."""
    if run is None:
        return None
    return dataclasses.replace(run, counts=list(run.counts), kept_positions=dict(run.kept_positions),
                               groups=list(run.groups), pending=dict(run.pending), group_kwargs=dict(run.group_kwargs))


def _row_slices(counts: list[int], batch: int, total: int) -> list[slice]:
    """Per text-model row, the slice of the caller's vision tokens (laid out sample after sample) it holds; rows
    beyond the caller's batch (beam search repeats each sample) map to sample row // (batch // samples)."""
    per_sample = _caller_counts(counts, batch, total)
    offsets = np.cumsum([0, *per_sample]).tolist()
    repeat = batch // len(per_sample)
    return [slice(offsets[row // repeat], offsets[row // repeat + 1]) for row in range(batch)]


def _caller_counts(counts: list[int], batch: int, total: int) -> list[int]:
    """Vision tokens per caller sample, from the per-row counts of a batch that may repeat samples (beams)."""
    for samples in range(1, batch + 1):
        if batch % samples == 0:
            repeat = batch // samples
            per_sample = counts[::repeat]
            if sum(per_sample) == total and all(counts[i] == per_sample[i // repeat] for i in range(batch)):
                return per_sample
    raise ValueError(f"the layout lists {total} vision tokens, but the prompts hold {counts}; the processor outputs "
                     "passed to the call do not describe these prompts")


def _last_position(hidden: torch.Tensor) -> torch.Tensor:
    """(B,) the last position of a (B, T, D) stream: the query when nothing was reduced."""
    return torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)


def _gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, D) gathered along T with index (B, T') -> (B, T', D)."""
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def _sample_seeds(input_ids: torch.Tensor | None, ids_mask: torch.Tensor | None, input_mask: torch.Tensor,
                  query: torch.Tensor, ids_prompt_length: int | None = None) -> torch.Tensor:
    """(B,) a checksum of each sample's real prompt tokens, so seeded methods ignore padding and batch makeup.

    `input_ids` / `ids_mask`: what the multimodal module received; `input_mask` / `query`: the text model's mask and
    query; `ids_prompt_length`: the prompt's length in `input_ids` inside a generate() (None: all of them)."""
    if input_ids is not None and tuple(input_ids.shape) != tuple(input_mask.shape):
        # Placeholders were expanded before the text model: seed from the sample's own (unexpanded) prompt ids,
        # without its padding and without the tokens a cache-free generate() appended.
        length = input_ids.shape[1] if ids_prompt_length is None else ids_prompt_length
        query = torch.full((input_ids.shape[0],), length - 1)
        input_mask = torch.ones(input_ids.shape, dtype=torch.bool) if ids_mask is None else ids_mask.bool()
    seeds = []
    for row in range(input_mask.shape[0]):
        if input_ids is None:
            seeds.append(0)
            continue
        tokens = input_ids[row, : int(query[row]) + 1][input_mask[row, : int(query[row]) + 1].to(input_ids.device)]
        seeds.append(zlib.crc32(np.asarray(tokens.cpu(), dtype=np.int64).tobytes()))
    return torch.tensor(seeds, dtype=torch.long)

