"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both merge projected vision features into the positions of `config.image_token_id`; LLaVA-NeXT's anyres crops and
its `image_newline` rows use the same placeholder id, so one vision mask covers base image, crops and newlines.
The adapter takes the whole model or its inner `.model` (`LlavaModel` / `LlavaNextModel`, no LM head).

`token_layout` reads every image of the inputs (`pixel_values` rows, LLaVA-NeXT's `image_sizes`), so it is the batch
layout as well, several images per prompt included. Vision tower (for before-the-LLM methods that read it): CLIP,
CLS first, `encoder.layers[i].self_attn` with q/k projections (the defaults of `ModelAdapter`); a token reads the one
patch under it (LLaVA-NeXT: of its base image or crop; newline tokens read none).
"""

from __future__ import annotations

import torch

from .base import NEWLINE, ComposedVLMAdapter, ImageGrid, TokenCell

__all__ = ["LlavaAdapter"]


class LlavaAdapter(ComposedVLMAdapter):
    model_types = ("llava", "llava_next")
    expects = "LlavaForConditionalGeneration / LlavaNextForConditionalGeneration"

    def vision_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        token_id = getattr(config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(config, "image_token_index", None)
        if token_id is None:
            raise ValueError(f"{config.model_type} config has no image_token_id; cannot locate the vision tokens")
        return (int(token_id),)

    def token_layout(self, inputs: dict) -> tuple[list[TokenCell], list[ImageGrid]]:
        """LLaVA-1.5: image i's tokens are its (S/p)^2 patches in row-major order (CLS dropped). LLaVA-NeXT
        (anyres): the base image's patches, then the crops' patches as one big feature map (crops row by row),
        unpadded to the image's aspect ratio, each feature row followed by one newline token; unpadding is taken
        from transformers itself (`unpad_image` on a map of cell indices), so it cannot drift."""
        config = self.model.config
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        cells: list[TokenCell] = []
        grids: list[ImageGrid] = []
        if config.model_type == "llava":
            for image in range(inputs["pixel_values"].shape[0]):
                cells += [TokenCell(image, 0, r, c) for r in range(side) for c in range(side)]
                grids.append(ImageGrid((0, 0), side))
            return cells, grids
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        for image, size in enumerate(inputs["image_sizes"].tolist()):
            cells += [TokenCell(image, 0, r, c) for r in range(side) for c in range(side)]
            rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vision.image_size)
            width = cols * side
            index = torch.arange(rows * side * width).view(1, rows * side, width)
            for feature_row in unpad_image(index, size)[0].tolist():
                for flat in feature_row:
                    big_r, big_c = divmod(int(flat), width)
                    crop = (big_r // side) * cols + big_c // side
                    cells.append(TokenCell(image, 1 + crop, big_r % side, big_c % side))
                cells.append(TokenCell(image, NEWLINE, int(feature_row[0]) // width, -1))
            grids.append(ImageGrid((rows, cols), side))
        return cells, grids
