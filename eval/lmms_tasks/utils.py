"""Functions of the offline lmms-eval tasks `mmreduce_shapes_tiny` and `mmreduce_docs_tiny` (see their yaml files).

Each document row names a sample of one of mmreduce's seeded benchmarks (benchmark, split, seed, index, generator
options) plus its question and answer; the image is redrawn from those fields, so the tasks need no hub, no image
files, and stay identical to what `mmreduce bench` evaluates.

    python eval/lmms_tasks/utils.py     # rewrites shapes_tiny.jsonl and docs_tiny.jsonl (8 test samples, seed 0)
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

__all__ = [
    "DOCS_FILE", "DOCS_TASK_FILE", "doc_to_choice", "doc_to_target", "doc_to_target_index", "doc_to_text", "doc_to_visual", "make_docs",
    "process_results", "process_results_mc", "write_docs",
]

DOCS_FILE = Path(__file__).resolve().parent / "shapes_tiny.jsonl"
DOCS_TASK_FILE = Path(__file__).resolve().parent / "docs_tiny.jsonl"


def make_docs(n: int = 8, seed: int = 0, image_size: int = 128) -> list[dict]:
    """The first `n` `shapes` test samples as task documents (image_size matches `tiny-llava-shapes`)."""
    from mmreduce.eval.benchmarks import load_benchmark

    samples = load_benchmark("shapes", "test", n, seed=seed, image_size=image_size)
    return [{"benchmark": "shapes", "split": "test", "seed": seed, "index": i, "image_size": image_size,
             "qtype": s.meta["qtype"], "question": s.question, "answer": s.answer, "choices": list(s.choices)}
            for i, s in enumerate(samples)]


def make_page_docs(n: int = 8, seed: int = 0, page: tuple[int, int] = (128, 128)) -> list[dict]:
    """The first `n` `docs` test samples (pages of `page` pixels, as the bundled docs models are trained)."""
    from mmreduce.eval.benchmarks import load_benchmark

    options = {"page_sizes": [list(page)]}
    samples = load_benchmark("docs", "test", n, seed=seed, **options)
    return [{"benchmark": "docs", "split": "test", "seed": seed, "index": i, "options": options,
             "qtype": s.meta["qtype"], "question": s.question, "answer": s.answer, "choices": list(s.choices)}
            for i, s in enumerate(samples)]


def write_docs(path: str | Path = DOCS_FILE, docs: list[dict] | None = None, **options) -> Path:
    path = Path(path)
    docs = make_docs(**options) if docs is None else docs
    path.write_text("".join(json.dumps(doc, sort_keys=True) + "\n" for doc in docs))
    return path


def doc_to_visual(doc: dict) -> list:
    from mmreduce.eval.benchmarks import make_sample

    options = doc.get("options") or {"image_size": int(doc["image_size"])}
    if "page_sizes" in options:
        options = {**options, "page_sizes": tuple(tuple(size) for size in options["page_sizes"])}
    sample = make_sample(doc["benchmark"], doc["split"], int(doc["seed"]), int(doc["index"]), **options)
    if sample.question != doc["question"]:  # the generator changed since the file was written
        raise ValueError(f"{doc['benchmark']} task doc {doc['index']}: stored question {doc['question']!r} but the "
                         f"generator now draws {sample.question!r}; rerun `python eval/lmms_tasks/utils.py`")
    return [image.convert("RGB") for image in sample.images]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    """The question type's closed answer vocabulary (the multiple-choice variant scores each by loglikelihood)."""
    return list(doc["choices"])


def doc_to_target_index(doc: dict) -> int:
    return list(doc["choices"]).index(doc["answer"])


def process_results_mc(doc: dict, results: list) -> dict:
    """Accuracy of the most likely choice. lmms-eval 0.7.3 hands loglikelihood results over as `str((ll, greedy))`
    (`unwrap_generation_output` stringifies every non-string answer), which its default multiple-choice scoring
    cannot unpack; parse both forms."""
    scores = [float((ast.literal_eval(r) if isinstance(r, str) else r)[0]) for r in results]
    return {"acc": float(scores.index(max(scores)) == doc_to_target_index(doc))}


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the first generated word (the tiny models answer one closed-vocabulary word)."""
    from mmreduce.eval.accuracy import normalize_answer

    return {"exact_match": float(normalize_answer(results[0]) == doc["answer"])}


if __name__ == "__main__":
    print(write_docs())
    print(write_docs(DOCS_TASK_FILE, docs=make_page_docs()))
