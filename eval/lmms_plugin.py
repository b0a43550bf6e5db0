"""lmms-eval model plugin: evaluate a local checkpoint of any family with an adapter (LLaVA, LLaVA-NeXT, ...) with
mmreduce's vision-token reduction on.

    lmms-eval --model mmreduce \\
        --model_args pretrained=/ckpt/llava-1.5-7b-hf,method=pdrop,keep_ratio=0.5,layers=8+16+24 \\
        --tasks gqa,pope --batch_size 8

    # offline: the bundled tiny model on the bundled tiny task (eval/lmms_tasks/)
    HF_HUB_OFFLINE=1 lmms-eval --model mmreduce \\
        --model_args pretrained=tiny-llava-shapes,method=pdrop,keep_ratio=0.5 \\
        --tasks mmreduce_shapes_tiny --include_path eval/lmms_tasks --batch_size 4

lmms-eval splits `--model_args` at every comma, so a method's fields are separate model args (`method=pdrop,
keep_ratio=0.5`), lists are joined with `+` (`layers=2+4+6`), and `method=pdrop:keep_ratio=0.5` (one field) or
`method=fastv,equivalent=64` (keep_ratio fitted to 64 tokens averaged over layers, see `mmreduce.spec`) work
too. `method=baseline` (the default) runs the unreduced model, still measured.

lmms-eval finds the plugin through the `lmms_eval.models` entry point (`manifest` below). This module imports
without lmms-eval; only building the model needs it, and then the error says how to install it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mmreduce
from mmreduce import MethodSpec, parse_spec
from mmreduce.adapters import get_adapter

try:  # lmms-eval is optional: the plugin class needs its base class, nothing else here does
    from lmms_eval.api.model import lmms as _LmmsBase

    _LMMS_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # keep the cause: a broken install (e.g. an av clash) must not read as "missing"
    _LmmsBase = object
    _LMMS_IMPORT_ERROR = exc

__all__ = [
    "INSTALL_HINT",
    "MODEL_ID",
    "TASKS_DIR",
    "MMReduceLMM",
    "PluginArgs",
    "RunStats",
    "build_prompt",
    "manifest",
    "parse_model_args",
    "require_lmms_eval",
]

MODEL_ID = "mmreduce"
#: the offline tiny task(s); pass as `--include_path` / `TaskManager(include_path=...)`
TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"
INSTALL_HINT = (
    "the mmreduce lmms-eval plugin needs lmms-eval: `pip install lmms-eval==0.7.3 av==15.1.0 filelock==3.32.7` "
    "(lmms-eval 0.6-0.7 require av<16, and 0.7.3's evaluator imports filelock._api, which filelock 4 removed; "
    "older releases pin transformers 4.37 or httpx 0.23)"
)
# Answers used when a task gives no max_new_tokens (lmms-eval's own HF models default to 1024, far too long for
# short-answer VQA on CPU); a task's or the user's value always wins.
DEFAULT_MAX_NEW_TOKENS = 128
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_log = logging.getLogger(__name__)
if _LMMS_IMPORT_ERROR is None:
    from loguru import logger as _log  # lmms-eval configures loguru; our lines then appear with its own


def require_lmms_eval() -> None:
    """Raises ImportError naming the install command when lmms-eval is not importable."""
    if _LMMS_IMPORT_ERROR is not None:
        raise ImportError(f"{INSTALL_HINT}; importing lmms_eval failed with: {_LMMS_IMPORT_ERROR}") \
            from _LMMS_IMPORT_ERROR


def manifest():
    """Entry point of group `lmms_eval.models`: registers `--model mmreduce` (a "simple" model: it gets
    `doc_to_visual` / `doc_to_text`, which every image task provides)."""
    require_lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MMReduceLMM")


@dataclass(frozen=True)
class PluginArgs:
    """The validated `--model_args`.

    - pretrained: a checkpoint directory (or a bundled tiny model name, or anything `from_pretrained` accepts).
    - spec: the reduction (`baseline` = unreduced, still measured).
    - device: `auto` picks cuda when available; dtype `auto` is float32 on CPU, bfloat16 on GPU.
    - max_new_tokens: when given, overrides the task's `generation_kwargs.max_new_tokens`.
    """

    pretrained: str
    spec: MethodSpec
    batch_size: int = 1
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_new_tokens: int | None = None
    attn_implementation: str = "sdpa"


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"model_args: {name} must be a positive integer, got {value!r}")
    return number


def _method_spec(method: Any, fields: dict[str, Any]) -> MethodSpec:
    text = str(method).strip().strip("'\"")
    # lmms-eval already turned "0.5" into 0.5, "2" into 2 and "true" into True; str() gives parse_spec back the same
    # text, and a list field given one value (`layers=2`) is the one-element list.
    extra = [f"{key}={value}" for key, value in fields.items()]
    if extra:  # fields outside method= belong to the last method of a composed SPEC
        last = text.split(" then ")[-1]
        text += ("," if ":" in last else ":") + ",".join(extra)
    try:
        return parse_spec(text)
    except ValueError as exc:
        raise ValueError(f"model_args: bad method {text!r}: {exc}") from None


def parse_model_args(pretrained: str | None = None, method: Any = "baseline", batch_size: Any = 1,
                     device: str | None = "auto", dtype: str = "auto", max_new_tokens: Any = None,
                     attn_implementation: str = "sdpa", max_batch_size: Any = None, **method_fields: Any) -> PluginArgs:
    """`--model_args` (already split by lmms-eval) -> PluginArgs; unknown keys are fields of `method`.

    `max_batch_size` is accepted and ignored: lmms-eval passes it to every model.
    """
    if not pretrained or not isinstance(pretrained, str):
        raise ValueError(f"model_args: pretrained=<checkpoint directory or bundled tiny model name> is required, "
                         f"got {pretrained!r}")
    if str(batch_size) == "auto":
        raise ValueError("model_args: batch_size='auto' is not supported by the mmreduce plugin; give an integer")
    device = "auto" if device in (None, "") else str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # `accelerate launch`: lmms-eval shards the requests by rank; each process takes its own GPU.
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if dtype == "auto":
        resolved_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    elif dtype in _DTYPES:
        resolved_dtype = _DTYPES[dtype]
    else:
        raise ValueError(f"model_args: dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return PluginArgs(
        pretrained=pretrained,
        spec=_method_spec(method, method_fields),
        batch_size=_positive_int("batch_size", batch_size),
        device=device,
        dtype=resolved_dtype,
        max_new_tokens=None if max_new_tokens is None else _positive_int("max_new_tokens", max_new_tokens),
        attn_implementation=str(attn_implementation),
    )


def build_prompt(processor, question: str, num_images: int) -> str:
    """The checkpoint's own chat format for one user turn: `num_images` images, then the question.

    Tasks that already write `<image>` placeholders into the question get them moved in front (LLaVA's
    training format), so each image is announced exactly once.
    """
    question = question.replace("<image>", "").strip()
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    # No template shipped: LLaVA-1.5's conversation format.
    return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


@dataclass
class RunStats:
    """What the reduction saved over one `generate_until` / `loglikelihood` call, summed over its batches."""

    method: str
    requests: int = 0
    equivalent_vision_tokens: float = 0.0  # sum over requests
    vision_tokens: float = 0.0  # sum over requests
    prefill_flops: float = 0.0
    baseline_prefill_flops: float = 0.0
    prefill_ms: list[float] = field(default_factory=list)

    def add(self, stats: mmreduce.ReductionStats) -> None:
        n = len(stats.initial_vision_tokens)
        flops, baseline = stats.flops()
        self.requests += n
        self.equivalent_vision_tokens += stats.equivalent_vision_tokens * n
        self.vision_tokens += sum(stats.initial_vision_tokens)
        self.prefill_flops += flops
        self.baseline_prefill_flops += baseline
        self.prefill_ms.append(stats.prefill_ms)

    def summary(self) -> dict[str, Any]:
        n = max(self.requests, 1)
        return {
            "method": self.method,
            "requests": self.requests,
            "vision_tokens": self.vision_tokens / n,
            "equivalent_vision_tokens": self.equivalent_vision_tokens / n,
            "prefill_flops": self.prefill_flops,
            "baseline_prefill_flops": self.baseline_prefill_flops,
            "prefill_flops_ratio": (self.prefill_flops / self.baseline_prefill_flops
                                    if self.baseline_prefill_flops else None),
            "prefill_ms_per_batch": sum(self.prefill_ms) / len(self.prefill_ms) if self.prefill_ms else None,
        }


def _load(args: PluginArgs):
    from transformers import AutoConfig, AutoProcessor

    from mmreduce.adapters import model_class_for

    from .tiny_models import CHECKPOINT_DIR, resolve_checkpoint

    path: str | Path = args.pretrained
    if not Path(path).is_dir() and (CHECKPOINT_DIR / str(path)).is_dir():
        path = resolve_checkpoint(path)  # a bundled tiny model by name
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model_args: pretrained={args.pretrained!r} is neither a checkpoint directory nor a bundled "
                         f"tiny model (in {CHECKPOINT_DIR}) nor loadable by from_pretrained: {exc}") from exc
    try:
        model_class = model_class_for(config)
    except ValueError as exc:
        raise ValueError(f"model_args: pretrained={args.pretrained!r}: {exc}") from None
    model = model_class.from_pretrained(path, dtype=args.dtype, attn_implementation=args.attn_implementation)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    return model.to(args.device).eval(), processor


class MMReduceLMM(_LmmsBase):
    """lmms-eval model `mmreduce`: a checkpoint of a family with an adapter, under `mmreduce.wrap` (module doc)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: Any = "baseline", **kwargs: Any) -> None:
        require_lmms_eval()
        super().__init__()
        self.args = parse_model_args(pretrained, method, **kwargs)
        self.model, self.processor = _load(self.args)
        self._device = torch.device(self.args.device)
        self.batch_size_per_gpu = self.args.batch_size
        self.chat_template = None  # lmms-eval's --apply_chat_template hook; we always use the checkpoint's own
        self.run_log: list[dict[str, Any]] = []  # one RunStats.summary() per generate_until / loglikelihood call
        self._reduced = None if self.args.spec.equivalent is not None else self._wrap(self._build_method(None))

    # ---- lmms-eval properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ---- reduction -----------------------------------------------------------------------------------------
    def _build_method(self, vision_tokens: int | None):
        depth = get_adapter(self.model).num_layers
        return self.args.spec.build(num_layers=depth, vision_tokens=vision_tokens)

    def _wrap(self, method) -> mmreduce.ReducedModel:
        reduced = mmreduce.wrap(self.model, method)
        _log.info(f"mmreduce: {self.args.pretrained} wrapped with {method.describe()}")
        return reduced

    def _reduced_for(self, inputs: dict) -> mmreduce.ReducedModel:
        if self._reduced is None:  # equivalent budget: fitted to the first image's vision tokens
            tokens = int(get_adapter(self.model).count_vision_tokens(inputs["input_ids"][:1])[0])
            self._reduced = self._wrap(self._build_method(tokens))
        return self._reduced

    def _report(self, run: RunStats, kind: str) -> None:
        summary = run.summary()
        self.run_log.append(summary)
        ratio = summary["prefill_flops_ratio"]
        _log.info(f"mmreduce {kind}: {summary['method']} over {summary['requests']} requests: "
                  f"{summary['equivalent_vision_tokens']:.1f} equivalent vision tokens of "
                  f"{summary['vision_tokens']:.1f}, prefill FLOPs {ratio:.1%} of unreduced"
                  if ratio is not None else f"mmreduce {kind}: no prefill ran")

    # ---- inputs --------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id: int, task: str, split: str) -> list:
        from PIL import Image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(f"task {task!r} gives a {type(visual).__name__} visual (doc {doc_id}); the "
                                          "mmreduce plugin takes images only (videos: pass sampled frames as images)")
        return [v.convert("RGB") for v in visuals]

    def _encode(self, contexts: list[str], visuals: list[list]) -> dict:
        prompts = [build_prompt(self.processor, c, len(v)) for c, v in zip(contexts, visuals)]
        images = [image for per_request in visuals for image in per_request]
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        return {k: (v.to(self.device, self.args.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    # ---- lmms-eval requests --------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        from lmms_eval import utils
        from tqdm.auto import tqdm

        # Sorted longest first (batches of similar length, less padding); grouped so one batch shares gen_kwargs.
        collator = utils.Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        run, results = None, []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mmreduce generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            visuals = [self._visuals(f, d, t, s) for f, d, t, s in zip(doc_to_visuals, doc_ids, tasks, splits)]
            inputs = self._encode(list(contexts), visuals)
            gen_kwargs = dict(all_gen_kwargs[0])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            reduced = self._reduced_for(inputs)
            with torch.inference_mode():
                out = reduced.generate(**inputs, **self._generation_options(gen_kwargs))
            run = run or RunStats(reduced.method.describe())
            run.add(reduced.stats)
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for context, text in zip(contexts, texts):
                for stop in until:  # lmms-eval's contract: the answer ends before the first stop string
                    text = text.split(stop)[0] if stop else text
                results.append(text.strip())
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), results[-1])
            bar.update(len(chunk))
        bar.close()
        if run is not None:
            self._report(run, "generate_until")
        return collator.get_original(results)

    def _generation_options(self, gen_kwargs: dict) -> dict:
        max_new = self.args.max_new_tokens or gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        options = dict(max_new_tokens=int(max_new), do_sample=temperature > 0,
                       num_beams=int(gen_kwargs.get("num_beams") or 1), pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            options.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
        return options

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """log P(continuation | image(s), context) and whether greedy decoding gives it, one request at a time.

        Scored the way `generate` would produce it: a reduced prefill of the context (so the vision tokens are
        chosen from the last *context* token, never from the continuation being scored), then one cached decode
        step per continuation token.
        """
        from tqdm.auto import tqdm

        run, results = None, []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
                [r.args for r in requests], disable=self.rank != 0, desc="mmreduce loglikelihood"):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            inputs = self._encode([context], [self._visuals(doc_to_visual, doc_id, task, split)])
            cont_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            cont_ids = cont_ids.to(self.device)
            if cont_ids.shape[1] == 0:
                raise ValueError(f"task {task!r} doc {doc_id}: continuation {continuation!r} encodes to no tokens")
            reduced = self._reduced_for(inputs)
            with torch.inference_mode():
                logits = self._continuation_logits(reduced, inputs, cont_ids)
            run = run or RunStats(reduced.method.describe())
            run.add(reduced.stats)
            scored = logits.float().log_softmax(-1)
            logprob = scored.gather(-1, cont_ids[0][:, None]).sum().item()
            greedy = bool((scored.argmax(-1) == cont_ids[0]).all())
            results.append((logprob if math.isfinite(logprob) else float("-inf"), greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        if run is not None:
            self._report(run, "loglikelihood")
        return results

    @staticmethod
    def _continuation_logits(reduced, inputs: dict, cont_ids: torch.Tensor) -> torch.Tensor:
        """(len(continuation), vocab) logits predicting each continuation token (batch of one)."""
        out = reduced(**inputs, use_cache=True)
        logits, mask = [out.logits[0, -1]], inputs["attention_mask"]
        for step in range(cont_ids.shape[1] - 1):  # single-token steps: mmreduce's decode path, as in generate()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            out = reduced(input_ids=cont_ids[:, step:step + 1], attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
        return torch.stack(logits)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the mmreduce plugin answers single-turn tasks only (generate_until, loglikelihood)")
