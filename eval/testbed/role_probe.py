"""Where a tiny `shapes` checkpoint tells the asked object of a `position` question from its reference.

    python -m mmreduce.eval.testbed.role_probe tiny-llava-shapes --samples 300 --answer-samples 200 --seed 0

Prints JSON with, for every decoder layer input l (`hidden_states[l]`: 0 = embeddings, L = final):
- `image_roles[l]`: test accuracy of a linear probe (logistic regression on standardised states, fit on the
  `calibration` split, scored on `test`) that tells the image tokens under the asked object from those under the
  reference (`train.targets.relevance_targets`), on `samples` `position` questions per split;
- `word_roles[l]`: the same probe for the question's two colour words (asked first, reference second);
- `position` answers on `answer_samples` calibration questions: accuracy, and how many errors keep the axis
  (left/right or above/below) but flip the side.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..accuracy import evaluate
from ..benchmarks import load_benchmark
from ..benchmarks.draw import COLORS
from ..tiny_models import load_tiny, prompt_for
from .train.targets import relevance_targets

__all__ = ["linear_probe_accuracy", "role_report"]

_AXIS = {"left": "x", "right": "x", "above": "y", "below": "y"}


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, l2: float = 1e-3) -> float:
    """Test accuracy of an L2-regularised logistic regression fit with L-BFGS (200 iterations).

    train_x: (N, D) features, train_y: (N,) labels in {0, 1}; test_x: (M, D), test_y: (M,). Features are
    standardised with the training mean and standard deviation.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    a, b = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    optim = torch.optim.LBFGS([w, c], max_iter=200)

    def closure():
        optim.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, train_y.float()) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    optim.step(closure)
    with torch.no_grad():
        return ((b @ w + c > 0).long() == test_y).float().mean().item()


@torch.no_grad()
def _role_states(model, processor, samples, batch_size: int) -> tuple[list, torch.Tensor, list, torch.Tensor]:
    """Per layer input, the states of the asked/reference image tokens and of the two colour words, with labels
    (0 asked, 1 reference): ([(n_img, D)] * (L + 1), (n_img,), [(n_words, D)] * (L + 1), (n_words,))."""
    colour_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(COLORS)))
    image, image_y, words, words_y = [], [], [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        inputs = processor(images=[s.image for s in batch], text=[prompt_for(processor, s.question) for s in batch],
                           return_tensors="pt", padding=True)
        states = model(**inputs, output_hidden_states=True).hidden_states  # (L + 1) x (B, T, D)
        is_image = inputs["input_ids"] == model.config.image_token_id  # (B, T)
        roles = torch.cat([relevance_targets(s, int(is_image[b].sum()), model.config)
                           for b, s in enumerate(batch)])  # (sum n_b,): 0 none, 1 asked, 2 reference
        named = roles > 0
        is_word = torch.isin(inputs["input_ids"], colour_ids)  # (B, T): the question's two colour words
        image.append([h[is_image][named] for h in states])
        image_y.append(roles[named] - 1)
        words.append([h[is_word] for h in states])
        words_y.append(torch.tensor([0, 1] * len(batch)))
    per_layer = lambda parts: [torch.cat(layer) for layer in zip(*parts)]  # noqa: E731
    return per_layer(image), torch.cat(image_y), per_layer(words), torch.cat(words_y)


def role_report(name_or_path: str, samples: int = 300, answer_samples: int = 200, seed: int = 0,
                batch_size: int = 25) -> dict:
    """The probes and the `position` answer breakdown described in the module docstring."""
    if samples < 1 or answer_samples < 1:
        raise ValueError(f"samples and answer_samples must be >= 1, got {samples!r}, {answer_samples!r}")
    model, processor = load_tiny(name_or_path)
    if model.config.model_type != "llava":
        raise ValueError(f"role_probe needs a LLaVA-1.5 shapes checkpoint, got model_type "
                         f"{model.config.model_type!r} from {name_or_path!r}")
    model.eval()
    fit, score = (_role_states(model, processor, load_benchmark("shapes", split, samples, seed=seed,
                                                                 qtypes=("position",)), batch_size)
                  for split in ("calibration", "test"))
    report = {"model": name_or_path, "samples": samples, "seed": seed}
    for key, index in (("image_roles", 0), ("word_roles", 2)):
        report[key] = [round(linear_probe_accuracy(a, fit[index + 1], b, score[index + 1]), 3)
                       for a, b in zip(fit[index], score[index])]
    questions = load_benchmark("shapes", "calibration", answer_samples, seed=seed, qtypes=("position",))
    accuracy, predictions = evaluate(model, processor, questions, batch_size=batch_size)
    errors = [(s.answer, p) for s, p in zip(questions, predictions) if p != s.answer]
    report["position_answers"] = {
        "samples": answer_samples, "accuracy": accuracy, "errors": len(errors),
        "errors_same_axis_other_side": sum(_AXIS.get(p) == _AXIS[a] for a, p in errors)}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmreduce.eval.testbed.role_probe",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model", help="bundled tiny model name or checkpoint directory (LLaVA-1.5, shapes)")
    parser.add_argument("--samples", type=int, default=300, help="position questions per split for the probes")
    parser.add_argument("--answer-samples", type=int, default=200, help="calibration position questions answered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(role_report(args.model, args.samples, args.answer_samples, args.seed, args.batch_size), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
