"""Print the README's Markdown tables from the result JSON files in this folder.

    .venv/bin/python tokenizers_visual/results/make_tables.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).parent


def _load(name: str) -> dict | None:
    p = HERE / name
    return json.loads(p.read_text()) if p.is_file() else None


def seed_table() -> str:
    rows = [(name, _load(f"seed-{name}.json")) for name in ("original", "improved")]
    rows = [(n, r) for n, r in rows if r]
    if not rows:
        return "(no SEED results yet)"
    lines = ["| metric | " + " | ".join(f"SEED, {n} VQ" for n, _ in rows) + " |",
             "|---|" + "---|" * len(rows)]
    keys = [("clip_i2t_R@1", "frozen CLIP i->t R@1"), ("clip_i2t_R@5", "frozen CLIP i->t R@5"),
            ("continuous_i2t_R@1", "continuous causal i->t R@1"), ("continuous_i2t_R@5", "continuous causal i->t R@5"),
            ("quantised_i2t_R@1", "quantised (ids) i->t R@1"), ("quantised_i2t_R@5", "quantised (ids) i->t R@5"),
            ("continuous_t2i_R@1", "continuous causal t->i R@1"), ("continuous_t2i_R@5", "continuous causal t->i R@5"),
            ("quantised_t2i_R@1", "quantised (ids) t->i R@1"), ("quantised_t2i_R@5", "quantised (ids) t->i R@5"),
            ("usage", "codebook usage (held-out)"), ("perplexity", "code perplexity"),
            ("rec_cos", "reconstruction cosine"), ("gen_cos", "generation-embedding cosine"),
            ("gen_mse", "generation-embedding MSE")]
    for key, label in keys:
        vals = []
        for _, r in rows:
            v = r[key]
            percent = key.startswith(("clip", "cont", "quant")) or key == "usage"
            vals.append(f"{100 * v:.1f}%" if percent else f"{v:.3f}")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def tokenunify_tables() -> str:
    out = []
    pred = _load("tokenunify-prediction.json")
    if pred:
        out += ["| model | next-token MSE (next head) | next-token MSE (pixel head at k) | masked-token MSE |",
                "|---|---|---|---|"]
        for name, r in pred.items():
            cells = [f"{r[k]:.4f}" if k in r else "-" for k in ("next_mse", "next_mse_pixel_head", "masked_mse")]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    roll = _load("tokenunify-rollout.json")
    if roll:
        steps = [s for s in (1, 2, 4, 8, 16, 32) if s <= len(next(iter(roll.values())))]
        out += ["", "| model | " + " | ".join(f"step {s}" for s in steps) + " | slope of log MSE vs log step |",
                "|---|" + "---|" * (len(steps) + 1)]
        for name, errs in roll.items():
            xs = [math.log(i + 1) for i in range(len(errs))]
            ys = [math.log(e) for e in errs]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            out.append(f"| {name} | " + " | ".join(f"{errs[s - 1]:.4f}" for s in steps) + f" | {slope:.3f} |")
    seg = _load("tokenunify-segmentation.json")
    if seg:
        out += ["", "| pretraining | VOI (bits) | ARAND | per-seed VOI |", "|---|---|---|---|"]
        for name, r in seg.items():
            if "voi_mean" in r:
                per = ", ".join(f"{s['voi']:.3f}" for s in r["per_seed"])
                out.append(f"| {name} | {r['voi_mean']:.3f} ± {r['voi_std']:.3f} | "
                           f"{r['arand_mean']:.3f} ± {r['arand_std']:.3f} | {per} (seeds {r['seeds']}) |")
            else:
                out.append(f"| {name} (post-processing ceiling) | {r['voi']:.3f} | {r['arand']:.3f} | - |")
    return "\n".join(out) if out else "(no TokenUnify results yet)"


if __name__ == "__main__":
    print(seed_table())
    print()
    print(tokenunify_tables())
