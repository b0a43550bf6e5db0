"""train.losses: the object-focused per-patch loss and the per-patch accuracy, against their definitions."""

from __future__ import annotations

import torch

from mmreduce.eval.testbed.train.losses import aux_loss, patch_accuracy, patch_loss


def test_patch_loss_object_focus_adds_the_object_tokens_mean():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 12)
    features = torch.randn(2, 5, 4)
    targets = torch.tensor([[0, 0, 8 * 2 + 3, 0, 0], [8 * 1 + 1, 0, 0, 0, 0]])  # two object tokens
    plain = patch_loss(head, features, targets, "shapes", 0, object_focus=False)
    focused = patch_loss(head, features, targets, "shapes", 0, object_focus=True)
    assert torch.allclose(plain, aux_loss(head, features, targets, "shapes"))
    objects = aux_loss(head, features[targets > 0], targets[targets > 0], "shapes")
    assert torch.allclose(focused - plain, objects)
    logits = head(features[targets > 0])
    colour = (logits[:, :7].argmax(-1) == torch.tensor([2, 1])).float().mean().item()
    shape = (logits[:, 7:12].argmax(-1) == torch.tensor([3, 1])).float().mean().item()
    assert patch_accuracy(head, features, targets, "shapes") == (colour, shape)
