"""The before-the-LLM stage on tiny LLaVA-1.5 and LLaVA-NeXT, against references the engine does not compute.

The reference is the unwrapped model's own text model run on inputs shortened by hand: the stock merged embeddings
(captured by a pre-hook on the text model of the unwrapped model), with vision tokens dropped or averaged here, the
attention mask left-padded here, and the position ids written here ("original": the positions the kept tokens had in
the caller's prompt; "packed": the shortened prompt numbered as the caller's forward or generate() would number
it). Two throw-away methods defined in this file plan fixed, known drops and merges, so every reference token is
known in advance. In-LLM drops after the before stage are checked against an eager run of that shortened prompt with
the dropped keys masked from the apply layer on (the mathematics of removing them, without the saving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

import mmreduce
from mmreduce.adapters import get_adapter
from mmreduce.methods import BeforeLLMMethod, Compose, FastV, Pool, Stride, TokenPlan, VisionTokens
from tests.support.masked_reference import eager
from tests.support.vlm_factory import IMAGE_TOKEN, llava_batch, llava_next_batch, select_samples, tiny_llava, \
    tiny_llava_next

LAYERS = 6
STEPS = 4
ATOL = 1e-5


# ---- two throw-away before-the-LLM methods with plans known in advance --------------------------------------------

def fixed_drops(count: int) -> set[int]:
    """The vision tokens (indices in the sample's prompt order) that `DropFixed` discards: every third one from the
    second on, and the last."""
    return {i for i in range(count) if i % 3 == 1} | {count - 1}


def fixed_merges(count: int) -> tuple[list[tuple[int, dict[int, float]]], set[int]]:
    """`MergePairs`' plan by blocks of 8 tokens: token 1 averaged into 0 (weights 3:1), token 2 into the later
    token 3 (1:1), 4 kept alone, 5 discarded, 7 into 6 (1:2). A group cut off by the end of the sample keeps its
    tokens alone. Returns [(kept token, {member: weight})] in prompt order and the discarded tokens."""
    pattern = [(0, {0: 3.0, 1: 1.0}), (3, {2: 1.0, 3: 1.0}), (4, {4: 1.0}), (6, {6: 1.0, 7: 2.0})]
    groups, discarded = [], set()
    for start in range(0, count, 8):
        for kept, members in pattern:
            if all(start + m < count for m in members):
                groups.append((start + kept, {start + m: w for m, w in members.items()}))
            else:
                groups += [(start + m, {start + m: 1.0}) for m in members if start + m < count]
        if start + 5 < count:
            discarded.add(start + 5)
    return sorted(groups), discarded


@dataclass
class DropFixed(BeforeLLMMethod):
    """Discards `fixed_drops` of every sample's vision tokens (with the layout: of its pixel tokens)."""

    name = "drop_fixed"

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        dropped = fixed_drops(tokens.count)
        return TokenPlan.select(torch.tensor([i not in dropped for i in range(tokens.count)]))


@dataclass
class DropFixedByLayout(DropFixed):
    """`DropFixed` shown only the pixel tokens: LLaVA-NeXT's newline tokens go with the reduced image."""

    name = "drop_fixed_by_layout"
    needs_layout = True


@dataclass
class MergePairs(BeforeLLMMethod):
    """Averages the `fixed_merges` groups with their weights and discards the rest."""

    name = "merge_pairs"

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        groups, _ = fixed_merges(tokens.count)
        keep = torch.zeros(tokens.count, dtype=torch.bool)
        target = torch.full((tokens.count,), -1, dtype=torch.long)
        weight = torch.zeros(tokens.count)
        for kept, members in groups:
            keep[kept] = True
            for member, w in members.items():
                target[member], weight[member] = kept, w
        return TokenPlan(keep, target, weight)


# ---- the hand reference --------------------------------------------------------------------------------------------

def hand_reduced(method: BeforeLLMMethod, features: torch.Tensor, newline: torch.Tensor | None
                 ) -> list[tuple[int, torch.Tensor]]:
    """One sample's vision tokens after `method`, worked out here: [(index of the token whose place it takes,
    (D,) features)] in prompt order. `features` (n, D); `newline` (D,) LLaVA-NeXT's newline feature (tokens equal
    to it cover no pixels) or None."""
    count = features.shape[0]
    if isinstance(method, MergePairs):
        groups, _ = fixed_merges(count)
        return [(kept, sum(w * features[m] for m, w in members.items()) / sum(members.values()))
                for kept, members in groups]
    if isinstance(method, DropFixedByLayout):
        is_newline = (features == newline).all(-1) if newline is not None else torch.zeros(count, dtype=torch.bool)
        pixel = [i for i in range(count) if not is_newline[i]]
        dropped = {pixel[j] for j in fixed_drops(len(pixel))} | {i for i in range(count) if is_newline[i]}
    elif isinstance(method, DropFixed):
        dropped = fixed_drops(count)
    elif isinstance(method, Stride):  # one panel per LLaVA-1.5 image: the middles of equal runs
        keep = math.ceil(method.keep_ratio * count)
        dropped = set(range(count)) - {int((j + 0.5) * count / keep) for j in range(keep)}
    else:
        raise AssertionError(f"no hand reference for {method}")
    return [(i, features[i]) for i in range(count) if i not in dropped]


@dataclass
class Shortened:
    """A batch shortened by hand. embeds (B, T', D), mask (B, T') long, left-padded; caller (B, T') index of each
    slot in the caller's prompt (-1 on padding); vision (B, T') bool kept vision slots."""

    embeds: torch.Tensor
    mask: torch.Tensor
    caller: torch.Tensor
    vision: torch.Tensor

    def positions(self, mode: str, caller_positions: torch.Tensor, numbering: str) -> torch.Tensor:
        """(B, T') position ids: "original" gathers `caller_positions` (B, T) at the kept tokens; "packed" numbers
        the shortened prompt as the caller's call would: `numbering` "forward" (0..T'-1 along the padded row, what
        a forward without position ids does) or "generate" (0.. over each row's real tokens, padding 0)."""
        if mode == "original":
            return caller_positions.gather(1, self.caller.clamp(min=0))
        if numbering == "forward":
            return torch.arange(self.mask.shape[1])[None].expand_as(self.mask)
        return (self.mask.cumsum(1) - 1).clamp(min=0)


def stock_text_inputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What the unwrapped model's text model receives in a stock forward: inputs_embeds (B, T, D) and the 2-D
    attention mask (B, T)."""
    adapter, seen = get_adapter(model), {}
    handle = adapter.text_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        handle.remove()
    return seen["inputs_embeds"], seen["attention_mask"]


def shorten(model, batch: dict, method: BeforeLLMMethod) -> Shortened:
    embeds, mask = stock_text_inputs(model, batch)
    vision = (batch["input_ids"] == IMAGE_TOKEN) & mask.bool()
    newline = getattr(model.model, "image_newline", None)
    rows = []
    for row in range(embeds.shape[0]):
        places = vision[row].nonzero().flatten().tolist()
        reduced = dict(hand_reduced(method, embeds[row, places], newline))
        last = int(mask[row].nonzero().max())
        if vision[row, last] and places.index(last) not in reduced:
            # The last prompt token is the query the caller reads: it stays, with its own features.
            reduced[places.index(last)] = embeds[row, last]
        tokens = []  # (caller index, features, is vision)
        for t in mask[row].nonzero().flatten().tolist():
            if not vision[row, t]:
                tokens.append((t, embeds[row, t], False))
            elif places.index(t) in reduced:
                tokens.append((t, reduced[places.index(t)], True))
        rows.append(tokens)
    length = max(len(tokens) for tokens in rows)
    out = Shortened(embeds.new_zeros(len(rows), length, embeds.shape[-1]), torch.zeros(len(rows), length,
                    dtype=torch.long), torch.full((len(rows), length), -1), torch.zeros(len(rows), length,
                    dtype=torch.bool))
    for row, tokens in enumerate(rows):
        for slot, (t, features, is_vision) in enumerate(tokens, start=length - len(tokens)):
            out.embeds[row, slot], out.mask[row, slot], out.caller[row, slot], out.vision[row, slot] = \
                features, 1, t, is_vision
    return out


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """How generate() numbers a left-padded prompt: 0.. over the real tokens, 0 on padding."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def text_logits(model, embeds, mask, positions, dropped_from: dict[int, torch.Tensor] | None = None,
                capture_layer: int | None = None):
    """The unwrapped text model on (B, T, D) `embeds`, then `adapter.logits_from_hidden`: (B, T, V) logits and, with
    `capture_layer`, that layer's eager attention weights (B, H, T, T). `dropped_from[l]` (B, T) bool: keys masked
    in layers >= l (eager, a 4-D additive mask over the causal, padding and dropped keys)."""
    adapter = get_adapter(model)
    dropped_from = dropped_from or {}
    captured, handles = {}, []

    def layer_hook(layer_idx):
        def hook(module, args, kwargs):
            active = [start for start in dropped_from if start <= layer_idx]
            if not active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            allowed = torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool).tril()[None] \
                & mask.bool()[:, None, :] & ~dropped_from[max(active)][:, None, :]
            minimum = torch.finfo(hidden.dtype).min
            kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, minimum)[
                :, None]
            return args, kwargs

        return hook

    for layer_idx, layer in enumerate(adapter.decoder_layers()):
        handles.append(layer.register_forward_pre_hook(layer_hook(layer_idx), with_kwargs=True))
    if capture_layer is not None:
        handles.append(adapter.decoder_layers()[capture_layer].self_attn.register_forward_hook(
            lambda m, a, out: captured.update(weights=out[1])))
    # The last decoder layer's output, before the final norm (what logits_from_hidden takes).
    handles.append(adapter.decoder_layers()[-1].register_forward_hook(
        lambda m, a, out: captured.update(hidden=out[0] if isinstance(out, tuple) else out)))
    try:
        with eager(model), torch.no_grad():
            adapter.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
            logits = adapter.logits_from_hidden(captured["hidden"])
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured.get("weights")


def reference_greedy(model, short: Shortened, positions: torch.Tensor, steps: int,
                     dropped_from: dict[int, torch.Tensor] | None = None):
    """Greedy decoding by full recomputation on the hand-shortened prompt; a new token takes the next position and
    is never dropped; suppressed tokens (the image placeholder) are never chosen, as in generate().
    Returns (new tokens (B, steps), per-step (B, V) logits)."""
    table = get_adapter(model).text_model.get_input_embeddings()
    embeds, mask, dropped_from = short.embeds, short.mask, dict(dropped_from or {})
    suppress = torch.tensor(model.generation_config.suppress_tokens or [], dtype=torch.long)
    tokens, step_logits = [], []
    for _ in range(steps):
        logits, _ = text_logits(model, embeds, mask, positions, dropped_from)
        last = logits[:, -1]
        step_logits.append(last)
        token = last.index_fill(1, suppress, float("-inf")).argmax(dim=-1, keepdim=True)  # (B, 1)
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, table(token)], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        dropped_from = {k: torch.cat([v, torch.zeros_like(token, dtype=torch.bool)], 1) for k, v in dropped_from.items()}
    return torch.cat(tokens, dim=1), step_logits


# ---- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava():
    return tiny_llava("sdpa", layers=LAYERS), llava_batch()


@pytest.fixture(scope="module")
def llava_next():
    model = tiny_llava_next("sdpa", layers=LAYERS)
    return model, llava_next_batch(model)


@pytest.fixture(params=["llava", "llava_next"])
def vlm(request):
    return request.getfixturevalue(request.param)


METHODS = [DropFixed, MergePairs, DropFixedByLayout]


# ---- 1. reduced prefill and greedy decoding equal the hand-shortened prompt ------------------------------------------

@pytest.mark.parametrize("positions", ["original", "packed"])
@pytest.mark.parametrize("method_class", METHODS, ids=lambda c: c.name)
def test_prefill_and_greedy_equal_the_hand_shortened_prompt(vlm, method_class, positions):
    model, batch = vlm
    method = method_class()
    short = shorten(model, batch, method)
    caller_length = batch["input_ids"].shape[1]
    with torch.no_grad(), mmreduce.wrap(model, method, positions=positions) as reduced:
        prefill = reduced(**batch, cache=DynamicCache(config=model.config.text_config), use_cache=True)
        logits = prefill.logits
        stats = reduced.stats
        # One decode step by hand: the caller's mask grows by one, position ids are left to the model.
        # (B, 1) the next token, never the image placeholder (a vision token in a decode step is refused)
        token = logits[:, -1].index_fill(1, torch.tensor([IMAGE_TOKEN]), float("-inf")).argmax(dim=-1, keepdim=True)
        step = reduced(input_ids=token, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(token)],
                                                                 dim=1), cache=prefill.cache, use_cache=True)
        generated = reduced.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)

    # Prefill (a forward: the caller's positions are 0..T-1 along the padded row), then the decode step.
    forward_positions = torch.arange(caller_length)[None].expand(batch["input_ids"].shape[0], -1)
    short_positions = short.positions(positions, forward_positions, "forward")
    reference, _ = text_logits(model, short.embeds, short.mask, short_positions)
    with torch.no_grad():
        grown = Shortened(torch.cat([short.embeds, get_adapter(model).text_model.get_input_embeddings()(token)], 1),
                          torch.cat([short.mask, torch.ones_like(token)], 1), short.caller, short.vision)
    step_reference, _ = text_logits(model, grown.embeds, grown.mask,
                                    torch.cat([short_positions, short_positions[:, -1:] + 1], dim=1))
    assert torch.allclose(step.logits[:, -1], step_reference[:, -1], atol=ATOL, rtol=0)
    assert logits.shape[:2] == batch["input_ids"].shape  # the caller's length
    assert torch.allclose(logits[:, -1], reference[:, -1], atol=ATOL, rtol=0)
    reached = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for row in range(short.caller.shape[0]):
        slots = short.mask[row].bool()
        reached[row, short.caller[row, slots]] = True
        assert torch.allclose(logits[row, short.caller[row, slots]], reference[row, slots], atol=ATOL, rtol=0)
    assert not logits[~reached].any(), "dropped, merged-away and padding positions must hold zeros"
    assert stats.kept_positions[0] == [short.caller[row][short.vision[row]].tolist() for row in range(len(short.caller))]
    assert stats.vision_tokens_per_layer == [[int(n)] * LAYERS for n in short.vision.sum(1)]

    # Greedy generate() (its positions count each row's real tokens).
    caller_positions = generate_positions(batch["attention_mask"])
    tokens, step_logits = reference_greedy(model, short, short.positions(positions, caller_positions, "generate"),
                                           STEPS)
    assert torch.equal(generated.sequences[:, caller_length:], tokens)
    for step, reference_step in zip(generated.logits, step_logits):
        assert torch.allclose(step, reference_step, atol=ATOL, rtol=0)
    # ...and the reduction really changed the prompt the text model saw.
    with torch.no_grad():
        assert (model(**batch).logits[:, -1] - logits[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("method_class", [DropFixed, MergePairs], ids=lambda c: c.name)
def test_prompt_ending_on_a_dropped_vision_token_keeps_it_as_the_query(llava, method_class):
    """Samples 0 and 2 end on their image, whose last token both methods remove (DropFixed discards it,
    MergePairs averages it into the one before): the caller reads the last position's logits, so it stays."""
    model, _ = llava
    batch = llava_batch(prompt_lengths=((3, 0), (1, 2), (4, 0)))
    short = shorten(model, batch, method_class())
    caller_length = batch["input_ids"].shape[1]
    with torch.no_grad(), mmreduce.wrap(model, method_class()) as reduced:
        logits = reduced(**batch).logits
        counts = reduced.stats.vision_tokens_per_layer
        generated = reduced.generate(**batch, max_new_tokens=STEPS, do_sample=False)
    forward_positions = torch.arange(caller_length)[None].expand(batch["input_ids"].shape[0], -1)
    reference, _ = text_logits(model, short.embeds, short.mask, forward_positions.gather(1, short.caller.clamp(min=0)))
    assert logits[:, -1].abs().amax(dim=-1).min() > 0
    assert torch.allclose(logits[:, -1], reference[:, -1], atol=ATOL, rtol=0)
    kept_by_plan = 64 - len(fixed_drops(64)) if method_class is DropFixed else len(fixed_merges(64)[0])
    assert [row[0] for row in counts] == [kept_by_plan + 1, kept_by_plan, kept_by_plan + 1]
    tokens, _ = reference_greedy(model, short, short.positions(
        "original", generate_positions(batch["attention_mask"]), "generate"), STEPS)
    assert torch.equal(generated[:, caller_length:], tokens)


def test_the_hand_reference_sees_every_newline_of_llava_next(llava_next):
    """`DropFixedByLayout`'s reference tells newline tokens by their feature (the model's image_newline vector):
    LLaVA-NeXT ends every feature row of the crops with one, so the tiny batch has some in every sample."""
    model, batch = llava_next
    embeds, mask = stock_text_inputs(model, batch)
    vision = (batch["input_ids"] == IMAGE_TOKEN) & mask.bool()
    newlines = ((embeds == model.model.image_newline).all(-1) & vision).sum(1)
    assert newlines.tolist() == [6, 8, 8]


# ---- 2. batches, caches, beams and sampling ------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["original", "packed"])
@pytest.mark.parametrize("method_class", [DropFixed, MergePairs], ids=lambda c: c.name)
def test_batch_alone_cache_beams_and_sampling(vlm, method_class, positions):
    model, batch = vlm
    caller_length = batch["input_ids"].shape[1]
    pad = (batch["attention_mask"] == 0).sum(1)
    greedy = dict(max_new_tokens=STEPS, do_sample=False)
    with torch.no_grad(), mmreduce.wrap(model, method_class(), positions=positions) as reduced:
        batched = reduced.generate(**batch, **greedy)
        batched_kept = reduced.stats.kept_positions[0]
        assert batched.shape == (batch["input_ids"].shape[0], caller_length + STEPS)
        assert torch.equal(batched[:, :caller_length], batch["input_ids"])
        for row in range(batch["input_ids"].shape[0]):
            alone = reduced.generate(**select_samples(batch, row), **greedy)
            assert torch.equal(alone[0, -STEPS:], batched[row, -STEPS:]), f"sample {row} differs alone"
            assert [p + int(pad[row]) for p in reduced.stats.kept_positions[0][0]] == batched_kept[row]

        assert torch.equal(reduced.generate(**batch, **greedy, use_cache=False), batched)

        beams = dict(max_new_tokens=STEPS, do_sample=False, num_beams=2)
        cached_beams = reduced.generate(**batch, **beams)
        assert cached_beams.shape == (batch["input_ids"].shape[0], caller_length + STEPS)
        assert torch.equal(reduced.generate(**batch, **beams, use_cache=False), cached_beams)

        sampled = []
        for _ in range(2):
            torch.manual_seed(11)
            sampled.append(reduced.generate(**batch, max_new_tokens=STEPS, do_sample=True, top_k=0))
        assert sampled[0].shape == (batch["input_ids"].shape[0], caller_length + STEPS)
        assert torch.equal(sampled[0], sampled[1])


# ---- 3. before + inside: both stages against one masked reference ------------------------------------------------

def composed_case(name):
    """(what wrap() gets, the before-the-LLM method, the in-LLM method) of a composed case."""
    if name == "stride_then_fastv":
        return ["stride", "fastv"], Stride(), FastV(layer=2, keep_ratio=0.5)
    return Compose(MergePairs(), FastV(layer=2, keep_ratio=0.5)), MergePairs(), FastV(layer=2, keep_ratio=0.5)


@pytest.mark.parametrize("positions", ["original", "packed"])
@pytest.mark.parametrize("family,case", [("llava", "stride_then_fastv"), ("llava_next", "merge_then_fastv")])
def test_composed_equals_masked_reference_on_the_shortened_prompt(request, family, case, positions):
    model, batch = request.getfixturevalue(family)
    spec, before, inside = composed_case(case)
    short = shorten(model, batch, before)
    with torch.no_grad():
        with mmreduce.wrap(model, spec, positions=positions) as reduced:
            assert reduced.method == Compose(before, inside)
            logits = reduced(**batch).logits
            stats = reduced.stats
            generated = reduced.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True)
            uncached = reduced.generate(**batch, max_new_tokens=STEPS, do_sample=False, use_cache=False)
        with mmreduce.wrap(model, inside) as inside_only:
            inside_only(**batch)
            inside_flops = inside_only.stats.prefill_flops

    # FastV by hand on the shortened prompt: at the input of layer 1, the last prompt token's eager attention
    # (mean over heads) ranks the kept vision tokens; the top ceil(r * n) (ties: earlier) stay from layer 2 on.
    forward_positions = short.positions(positions, torch.arange(batch["input_ids"].shape[1])[None].expand(
        batch["input_ids"].shape[0], -1), "forward")
    _, weights = text_logits(model, short.embeds, short.mask, forward_positions, capture_layer=1)
    scores = weights[:, :, -1, :].mean(dim=1)  # (B, T')
    dropped = torch.zeros_like(short.vision)
    fastv_kept = []
    for row in range(short.vision.shape[0]):
        candidates = short.vision[row].nonzero().flatten().tolist()
        wanted = -(-len(candidates) // 2)
        kept = sorted(sorted(candidates, key=lambda i: (-float(scores[row, i]), i))[:wanted])
        dropped[row, [i for i in candidates if i not in kept]] = True
        fastv_kept.append(short.caller[row, kept].tolist())
    reference, _ = text_logits(model, short.embeds, short.mask, forward_positions, {2: dropped})
    assert torch.allclose(logits[:, -1], reference[:, -1], atol=ATOL, rtol=0)

    before_counts = short.vision.sum(1).tolist()
    assert stats.initial_vision_tokens == ((batch["input_ids"] == IMAGE_TOKEN) & batch["attention_mask"].bool()
                                           ).sum(1).tolist()
    assert stats.vision_tokens_per_layer == [[n, n] + [-(-n // 2)] * (LAYERS - 2) for n in before_counts]
    assert stats.kept_positions[0] == [short.caller[row][short.vision[row]].tolist() for row in range(len(short.caller))]
    assert stats.kept_positions[2] == fastv_kept  # indices into the caller's prompt
    assert stats.prefill_flops < inside_flops

    tokens, step_logits = reference_greedy(
        model, short, short.positions(positions, generate_positions(batch["attention_mask"]), "generate"), STEPS,
        {2: dropped})
    assert torch.equal(generated.sequences[:, -STEPS:], tokens)
    assert torch.equal(uncached, generated.sequences)
    for step, reference_step in zip(generated.logits, step_logits):
        assert torch.allclose(step, reference_step, atol=ATOL, rtol=0)


# ---- 4. keep-all identity, unwrap, TokenPlan ---------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["original", "packed"])
@pytest.mark.parametrize("method", [Stride(keep_ratio=1.0), Pool(keep_ratio=1.0)], ids=["stride", "pool"])
def test_keep_all_is_bit_identical_and_unwrap_restores(vlm, method, positions):
    model, batch = vlm
    with torch.no_grad():
        stock_logits = model(**batch).logits
        stock_tokens = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        with mmreduce.wrap(model, method, positions=positions) as reduced:
            assert torch.equal(reduced(**batch).logits, stock_logits)
            assert torch.equal(reduced.generate(**batch, max_new_tokens=STEPS, do_sample=False), stock_tokens)
            assert not reduced.stats.reduced
        with mmreduce.wrap(model, MergePairs(), positions=positions) as reduced:
            reduced(**batch)
            reduced.generate(**batch, max_new_tokens=STEPS, do_sample=False)
            assert reduced.stats.reduced
        assert torch.equal(model(**batch).logits, stock_logits)
        assert torch.equal(model.generate(**batch, max_new_tokens=STEPS, do_sample=False), stock_tokens)


def test_token_plan_apply_merge_weights_and_check():
    torch.manual_seed(0)
    features = torch.randn(6, 5)
    # 0 kept alone; 1 averaged into 2 (weights 1:3); 3 discarded; 4 averaged into the later 5 (2:2).
    plan = TokenPlan(keep=torch.tensor([True, False, True, False, False, True]),
                     target=torch.tensor([0, 2, 2, -1, 5, 5]),
                     weight=torch.tensor([1.0, 1.0, 3.0, 0.0, 2.0, 2.0]))
    plan.check(6)
    out = plan.apply(features)
    assert torch.equal(out[0], features[0])  # untouched: copied bit for bit
    assert torch.allclose(out[1], (features[1] + 3 * features[2]) / 4, atol=1e-6)
    assert torch.allclose(out[2], (features[4] + features[5]) / 2, atol=1e-6)
    weights = plan.merge_weights()
    assert weights.shape == (3, 6)
    assert torch.allclose(weights.sum(dim=1), torch.ones(3, dtype=weights.dtype))
    assert torch.equal(TokenPlan.select(torch.ones(6, dtype=torch.bool)).apply(features), features)

    keep, target, weight = plan.keep, plan.target, plan.weight
    malformed = {
        "shape": TokenPlan(keep[:5], target, weight),
        "target itself": TokenPlan(keep, torch.tensor([2, 2, 2, -1, 5, 5]), weight),
        "not kept": TokenPlan(keep, torch.tensor([0, 3, 2, -1, 5, 5]), weight),
        "weights": TokenPlan(keep, target, torch.tensor([0.0, 1.0, 3.0, 0.0, 2.0, 2.0])),
    }
    for expected, bad in malformed.items():
        with pytest.raises(ValueError, match=expected):
            bad.check(6)


# ---- 5. refused inputs ---------------------------------------------------------------------------------------------

@dataclass
class MisPlanned(BeforeLLMMethod):
    """Returns a plan one token short."""

    name = "misplanned"

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        return TokenPlan.select(torch.ones(tokens.count - 1, dtype=torch.bool))


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_malformed_plan_is_refused_and_the_model_still_works(llava):
    model, batch = llava
    with torch.no_grad():
        stock = model(**batch).logits
        hooks = hook_count(model)
        with mmreduce.wrap(model, MisPlanned()) as reduced:
            with pytest.raises(ValueError, match=r"TokenPlan\.keep has shape \(63,\), expected \(64,\)"):
                reduced(**batch)
            with pytest.raises(ValueError, match="TokenPlan"):
                reduced.generate(**batch, max_new_tokens=2, do_sample=False)
        assert hook_count(model) == hooks
        assert torch.equal(model(**batch).logits, stock)


def test_layout_method_through_the_plain_model(llava_next):
    """The layout (crops, newlines) comes from the caller's processor outputs: a plain forward hands them to the
    multimodal module, plain generate() encodes the images first and does not, so it gets the clear message."""
    model, batch = llava_next
    with torch.no_grad(), mmreduce.wrap(model, Pool(keep_ratio=0.25)) as reduced:
        through_wrapper = reduced(**batch).logits
        assert torch.equal(model(**batch).logits, through_wrapper)
        with pytest.raises(ValueError, match="needs the token layout.*call the ReducedModel"):
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        reduced.generate(**batch, max_new_tokens=2, do_sample=False)  # the ReducedModel still works
        assert reduced.stats.reduced


def test_wrap_refuses_bad_compositions_and_positions(llava):
    model, batch = llava
    hooks = hook_count(model)
    with pytest.raises(ValueError, match=r"\[before-the-LLM method, in-LLM method\], got 3 items"):
        mmreduce.wrap(model, ["stride", "fastv", "pdrop"])
    with pytest.raises((ValueError, TypeError), match="before-the-LLM method"):
        mmreduce.wrap(model, ["fastv", "pool"])
    with pytest.raises(ValueError, match="positions must be one of .*'original', 'packed'.*'diagonal'"):
        mmreduce.wrap(model, "stride", positions="diagonal")
    assert hook_count(model) == hooks  # nothing was left installed
    with mmreduce.wrap(model, "stride") as reduced:  # ...and the model can be wrapped again
        assert reduced.method == Stride()


# ---- 6. prefill chunking -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [FastV(layer=2, keep_ratio=0.5), DropFixed()], ids=["in_llm", "before_llm"])
def test_prefill_chunking_is_refused(llava, method):
    model, batch = llava
    greedy = dict(max_new_tokens=STEPS, do_sample=False)
    with torch.no_grad(), mmreduce.wrap(model, method) as reduced:
        expected = reduced.generate(**batch, **greedy)
        with pytest.raises(ValueError, match="(?i)prefill.chunk"):
            reduced.generate(**batch, **greedy, prefill_chunk_size=8)
        assert torch.equal(reduced.generate(**batch, **greedy), expected)
        assert reduced.stats.reduced
