"""How the harness runs a model: one small interface, whatever the model is.

    runner = load_runner("tiny-llava-shapes", device="cpu")
    reason = runner.unsupported(method)            # None, or why this model cannot run the method
    record = runner.run_batch(samples, method, max_new_tokens=3)

`WrappedVLMRunner` runs a stock Hugging Face VLM under `mmreduce.wrap`; `eval/seed_vlm.py` provides the runner of
the SEED-token VLM. `load_runner` picks one from what the checkpoint folder holds, so the harness never imports a
model kind it does not run.
"""

from __future__ import annotations

import hashlib
import os
import resource
import statistics
from pathlib import Path
from typing import Sequence

import torch

import mmreduce
from mmreduce.adapters import get_adapter

from .accuracy import batch_inputs, normalize_answer
from .benchmarks import Sample

__all__ = ["BATCH_FIELDS", "PeakMemory", "Runner", "WrappedVLMRunner", "load_runner"]

#: What `run_batch` returns for one batch (per-sample means, except the totals named *_ms). `answers` hold each
#: decoded answer normalised to as many words as the sample's answer has; `peak_mem_mb` is `PeakMemory`'s.
BATCH_FIELDS = ("answers", "equivalent_vision_tokens", "vision_tokens", "prefill_flops", "baseline_prefill_flops",
                "prefill_ms", "decode_ms_per_token", "kv_cache_mb", "peak_mem_mb")


FULL_HASH_BYTES = 512 * 2**20
SAMPLE_BYTES = 16 * 2**20


class Runner:
    """A model the harness can evaluate: its depth, its vision tokens, and greedy answers under a method."""

    #: Written to results.json (`meta.runner`).
    kind = "runner"
    #: Whether `run_batch` calls `method.bind(samples, inputs, adapter)` when the method has one (the oracle
    #: reference needs it to see the batch's target boxes).
    binds_samples = False

    def __init__(self, checkpoint: Path | None, num_layers: int):
        self.checkpoint = checkpoint
        self.num_layers = num_layers

    def vision_tokens(self, sample: Sample) -> int:
        """Vision tokens of one sample's prompt (what `equivalent=` budgets are fitted to)."""
        raise NotImplementedError

    def unsupported(self, method: mmreduce.ReductionMethod) -> str | None:
        """Why this model cannot run `method` (the result row says so), or None."""
        return None

    def run_batch(self, samples: Sequence[Sample], method: mmreduce.ReductionMethod, max_new_tokens: int) -> dict:
        """Greedy answers of `samples` under `method`, with its cost: a dict of `BATCH_FIELDS`."""
        raise NotImplementedError

    def note(self, batches: list[dict]) -> str:
        """A remark for the result row of a method, from its batch records ("" for none)."""
        return ""

    def fingerprint(self) -> str:
        """Changes whenever the weights do, so a retrained model never reuses stale cached batches.

        Files up to `FULL_HASH_BYTES` are hashed whole; a larger one (a real 7B checkpoint) by its size,
        modification time and its first and last `SAMPLE_BYTES`, which a rewrite or copy changes too.
        """
        if self.checkpoint is None:
            return ""
        digest = hashlib.sha1()
        for path in sorted(self.checkpoint.glob("*.safetensors")):
            digest.update(path.name.encode())
            size = path.stat().st_size
            with open(path, "rb") as handle:
                if size <= FULL_HASH_BYTES:
                    digest.update(handle.read())
                    continue
                digest.update(f"{size}:{path.stat().st_mtime_ns}".encode())
                digest.update(handle.read(SAMPLE_BYTES))
                handle.seek(size - SAMPLE_BYTES)
                digest.update(handle.read(SAMPLE_BYTES))
        return digest.hexdigest()


class WrappedVLMRunner(Runner):
    """A Hugging Face VLM (any family with an adapter) evaluated through `mmreduce.wrap` and greedy `generate()`."""

    kind = "wrapped-vlm"
    binds_samples = True

    def __init__(self, model, processor, device: str, checkpoint: Path | None = None):
        self.model, self.processor, self.device = model, processor, device
        self.adapter = get_adapter(model)
        super().__init__(checkpoint, len(self.adapter.decoder_layers()))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device: str) -> "WrappedVLMRunner":
        from .tiny_models import load_tiny, resolve_checkpoint

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model, processor = load_tiny(name_or_path, dtype=dtype)
        return cls(model.to(device), processor, device, resolve_checkpoint(name_or_path))

    def inputs(self, samples: Sequence[Sample]) -> dict:
        """The processor batch of `samples` (prompts left-padded) on the runner's device."""
        return {k: v.to(self.device) for k, v in batch_inputs(self.processor, samples).items()}

    def vision_tokens(self, sample: Sample) -> int:
        return int(self.adapter.vision_mask(input_ids=self.inputs([sample])["input_ids"]).sum())

    def run_batch(self, samples: Sequence[Sample], method: mmreduce.ReductionMethod, max_new_tokens: int) -> dict:
        inputs = self.inputs(samples)
        if hasattr(method, "bind"):  # a reference that reads the samples (eval/oracle.py), not a method
            method.bind(samples, inputs, self.adapter)
        reduced = mmreduce.wrap(self.model, method)
        try:
            with torch.inference_mode(), PeakMemory(self.device) as memory:
                out = reduced.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=self.processor.tokenizer.pad_token_id,
                                       return_dict_in_generate=True)
            stats = reduced.stats
        finally:
            reduced.unwrap()
        new = out.sequences[:, inputs["input_ids"].shape[1]:]  # (B, new) generated ids only
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers) if cache else 0
        flops, baseline_flops = stats.flops()
        return {
            "answers": [normalize_answer(t, len(s.answer.split())) for t, s in zip(texts, samples)],
            "equivalent_vision_tokens": stats.equivalent_vision_tokens,
            "vision_tokens": statistics.mean(stats.initial_vision_tokens),
            "prefill_flops": flops / len(samples),
            "baseline_prefill_flops": baseline_flops / len(samples),
            "prefill_ms": stats.prefill_ms,
            "decode_ms_per_token": stats.decode_ms_per_token,
            "kv_cache_mb": kv_bytes / 2**20,
            "peak_mem_mb": memory.peak_mb,
        }


class PeakMemory:
    """The most memory a block adds on top of what was in use when it started (MB), so each method's batches are
    measured on their own, not against the process's lifetime peak.

    CUDA: `max_memory_allocated` after a reset, minus the memory allocated at the start. CPU on Linux: the peak
    resident set size (`VmHWM`, reset through /proc/self/clear_refs) minus the resident size at the start.
    Elsewhere on the CPU: the process's lifetime peak minus the start (`lifetime` is then True; an upper bound).
    """

    _STATUS = "/proc/self/status"

    def __init__(self, device: str):
        self.device = str(device)
        self.peak_mb = 0.0
        self.lifetime = False
        self._start = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        elif self._reset_cpu_peak():
            self._start = self._status_mb("VmRSS")
        else:
            self.lifetime = True
            self._start = self._status_mb("VmRSS") or 0.0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif not self.lifetime:
            peak = self._status_mb("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_mb = max(0.0, peak - self._start)

    @staticmethod
    def _reset_cpu_peak() -> bool:
        _release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # 5 resets the peak resident set size (Linux >= 4.0)
            return True
        except OSError:
            return False

    @classmethod
    def _status_mb(cls, key: str) -> float:
        try:
            with open(cls._STATUS) as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return 0.0


def _release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc `malloc_trim`), so that memory a block needs shows up as resident
    memory it adds; without this, memory freed by the previous block is reused unseen."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_runner(name_or_path: str | os.PathLike, device: str) -> Runner:
    """The runner for a bundled model name or a checkpoint folder, chosen from what the folder holds."""
    from .seed_vlm import SeedVLMRunner, is_seed_vlm

    if is_seed_vlm(name_or_path):
        return SeedVLMRunner.load(name_or_path, device)
    return WrappedVLMRunner.load(name_or_path, device)
