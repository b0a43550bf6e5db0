"""Held-out metrics of a SEED tokenizer: retrieval (CLIP, continuous causal, quantised), codebook, reconstruction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics import recall_at_k
from ..vq import codebook_stats
from .data import make_pairs
from .tokenizer import SeedTokenizer

__all__ = ["evaluate_seed"]


@torch.no_grad()
def evaluate_seed(tok: SeedTokenizer, n: int = 1000, seed: int = 2, batch: int = 250) -> dict[str, float]:
    """Metrics on n held-out generated pairs (data seed `seed`, disjoint from the training pool's seed).

    Retrieval is image->text and text->image over the n pairs, a hit being any gallery item with the same caption.
    "clip": the frozen CLIP tower; "continuous": last causal query vs text (ITC heads); "quantised": the same
    after encode -> ids -> decode (the reconstructed last query through vision_proj).
    """
    model = tok.model.eval()
    pixels, captions = make_pairs(n, seed=seed, size=tok.image_size)
    clip_img, cont, quant, ids_all, rec_cos, gen_cos, gen_mse = [], [], [], [], [], [], []
    for i in range(0, n, batch):
        px = pixels[i : i + batch]
        causal, tokens = model.causal_embeddings(px)
        clip_img.append(model.clip.image_embed(px, tokens))
        cont.append(model.itc_image(causal))
        ids = model.quantize(causal).ids  # (b, N)
        rec, gen = model.reconstruct(model.quantizer.lookup(ids))
        quant.append(model.itc_image(rec))
        ids_all.append(ids)
        rec_cos.append(F.cosine_similarity(rec, causal, dim=-1).mean(dim=1))  # (b,)
        target = model.generation_target(tokens)
        gen_cos.append(F.cosine_similarity(gen, target, dim=-1))
        gen_mse.append((gen - target).pow(2).mean(dim=1))
    text_ids = tok.vocab.encode(captions, tok.config.clip.text_length)
    clip_txt = model.clip.text_embed(text_ids)
    itc_txt = model.itc_text(text_ids)
    out: dict[str, float] = {}
    for name, img, txt in (("clip", clip_img, clip_txt), ("continuous", cont, itc_txt), ("quantised", quant, itc_txt)):
        sim = torch.cat(img) @ txt.T  # (n images, n texts)
        for direction, s in (("i2t", sim), ("t2i", sim.T)):
            for k, v in recall_at_k(s, captions, captions, ks=(1, 5)).items():
                out[f"{name}_{direction}_R@{k}"] = v
    usage, ppl = codebook_stats(torch.cat(ids_all), tok.codebook_size)
    out.update(usage=float(usage), perplexity=float(ppl), rec_cos=float(torch.cat(rec_cos).mean()),
               gen_cos=float(torch.cat(gen_cos).mean()), gen_mse=float(torch.cat(gen_mse).mean()),
               n_eval=n, eval_seed=seed, codebook_size=tok.codebook_size, num_tokens=tok.num_tokens)
    return out
