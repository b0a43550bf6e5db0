"""A model dispatched with accelerate (device_map, part offloaded to disk) still works under wrap."""

import torch
from accelerate import dispatch_model

import mmreduce


def test_device_map_with_disk_offload_gives_the_same_reduction(tmp_path, fresh_llava, llava_inputs):
    model, batch = fresh_llava, llava_inputs  # dispatch_model moves this model's weights: it must be its own
    with torch.no_grad(), mmreduce.wrap(model, "pdrop", keep_ratio=0.5) as reduced:
        expected = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
        expected_kept = reduced.stats.kept_positions
    layers = {f"model.language_model.layers.{i}": ("disk" if i in (2, 3, 5) else "cpu") for i in range(6)}
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu", "lm_head": "cpu", **layers}
    dispatched = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert dispatched.model.language_model.layers[2].self_attn.q_proj.weight.device.type == "meta"  # on disk
    with torch.no_grad(), mmreduce.wrap(dispatched, "pdrop", keep_ratio=0.5) as reduced:
        tokens = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
        assert reduced.stats.kept_positions == expected_kept
    assert torch.equal(tokens, expected)
