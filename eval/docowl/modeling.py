"""The stand-in's multimodal model (`DocOwlModel`) and its LM head (`DocOwlForConditionalGeneration`).

`DocOwlModel.forward` is DocOwl's `prepare_inputs_labels_for_multimodal`: each `<|image|>` placeholder of
`input_ids` (one per crop, `config.image_token_id`) is replaced by that crop's `tokens_per_crop` features (ViT ->
H-Reducer), crops taken in placeholder order over the batch; `modality_indicators` is 1 on those features (the eos
included) and 0 on text. The expanded prompt is left-padded again (each row's real tokens end at the last column) and
its 2-D attention mask and positions (count of real tokens before each one) are built for it, so the text model sees
a longer prompt than `input_ids`. Decode steps (a non-empty cache) embed the new tokens as text (indicators 0) and
need the 2-D mask at the text model's length: `generate()` keeps it, because the model returns the expanded mask
(`attention_mask` of the output) and `_update_model_kwargs_for_generation` continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import DocOwlConfig
from .hreducer import MplugDocOwlHReducerModel
from .pretrained import DocOwlPreTrainedModel
from .text import DocOwlTextModel
from .vision import MplugOwlVisionModel

__all__ = ["DocOwlCausalLMOutput", "DocOwlForConditionalGeneration", "DocOwlModel", "DocOwlModelOutput"]


@dataclass
class DocOwlModelOutput(ModelOutput):
    """`attention_mask` (B, T') and `modality_indicators` (B, T') are those of the sequence the text model saw."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    attention_mask: torch.Tensor | None = None
    modality_indicators: torch.Tensor | None = None


@dataclass
class DocOwlCausalLMOutput(ModelOutput):
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    attention_mask: torch.Tensor | None = None
    modality_indicators: torch.Tensor | None = None


class DocOwlModel(DocOwlPreTrainedModel):
    """`vision_model` (ViT) -> `vision2text` (H-Reducer) -> placeholders expanded -> `language_model`."""

    def __init__(self, config: DocOwlConfig):
        super().__init__(config)
        self.vision_model = MplugOwlVisionModel(config.vision_config)
        self.vision2text = MplugDocOwlHReducerModel(config.hreducer_config, config.text_config.hidden_size)
        self.language_model = DocOwlTextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) crops -> (N, tokens_per_crop, D_llm)."""
        return self.vision2text(self.vision_model(pixel_values).last_hidden_state)

    def expand(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor | None):
        """Placeholders -> features. Returns (inputs_embeds (B, T', D), attention_mask (B, T') long,
        modality_indicators (B, T') long), left-padded (padding slots hold zeros)."""
        batch, _ = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_image = (input_ids == self.config.image_token_id) & real
        found = int(is_image.sum())
        crops = 0 if features is None else features.shape[0]
        if found != crops:
            raise ValueError(f"{found} image placeholders (id {self.config.image_token_id}) in input_ids but "
                             f"{crops} crops in pixel_values; each crop needs exactly one placeholder")
        per_crop = self.config.tokens_per_crop
        span = torch.where(is_image, per_crop, 1) * real  # tokens each input position becomes (padding: 0)
        lengths = span.sum(dim=1)
        length = int(lengths.max())
        start = span.cumsum(dim=1) - span + (length - lengths)[:, None]  # (B, T) first slot of each position
        embeddings = self.get_input_embeddings()
        embeds = embeddings.weight.new_zeros(batch, length, embeddings.embedding_dim)
        indicators = torch.zeros(batch, length, dtype=torch.long, device=input_ids.device)
        rows, cols = (real & ~is_image).nonzero(as_tuple=True)
        embeds[rows, start[rows, cols]] = embeddings(input_ids[rows, cols])
        if crops:
            rows, cols = is_image.nonzero(as_tuple=True)  # row-major: the crops' order
            slots = start[rows, cols][:, None] + torch.arange(per_crop, device=input_ids.device)  # (N, per_crop)
            embeds[rows[:, None], slots] = features.to(embeds.dtype)
            indicators[rows[:, None], slots] = 1
        mask = torch.arange(length, device=input_ids.device)[None] >= (length - lengths)[:, None]
        return embeds, mask.long(), indicators

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        patch_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> DocOwlModelOutput:
        """`patch_positions` is accepted and unused, as in DocOwl 1.5 (the crop indicators are text)."""
        past = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is not None:  # embeddings given: text only, no expansion
            if input_ids is not None:
                raise ValueError("pass exactly one of input_ids and inputs_embeds")
            indicators = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        elif past > 0:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("image placeholders after the prompt (a non-empty cache) are not supported")
            inputs_embeds = self.get_input_embeddings()(input_ids)
            indicators = torch.zeros_like(input_ids)
        else:
            features = self.get_image_features(pixel_values) if pixel_values is not None else None
            inputs_embeds, attention_mask, indicators = self.expand(input_ids, attention_mask, features)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=inputs_embeds.device)
        # A mask longer than the cache is allowed: a wrapper that shortens the expanded prompt at the text model's
        # door (mmreduce's before-the-LLM stage) caches fewer tokens than the caller's mask counts, and hands the
        # text model a mask of its own; the positions below stay those of the caller's (expanded) sequence.
        if attention_mask.shape[1] < past + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens, but the text model holds {past} and gets "
                f"{length}: after a prefill with images, continue from the mask that prefill returned (the prompt "
                "is longer than input_ids once placeholders are expanded); generate() does this"
            )
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -length:]
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            modality_indicators=indicators,
        )
        return DocOwlModelOutput(last_hidden_state=outputs.last_hidden_state, cache=outputs.cache,
                                 attention_mask=attention_mask, modality_indicators=indicators)


class DocOwlForConditionalGeneration(DocOwlPreTrainedModel, GenerationMixin):
    def __init__(self, config: DocOwlConfig):
        super().__init__(config)
        self.model = DocOwlModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        patch_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> DocOwlCausalLMOutput:
        """Logits (B, T', V) over the expanded sequence (T' = the text model's length)."""
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        return DocOwlCausalLMOutput(logits=logits, cache=outputs.cache, attention_mask=outputs.attention_mask,
                                    modality_indicators=outputs.modality_indicators)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        # With a cache, decode steps continue the text model's (expanded) mask; a cache-free generate() expands the
        # placeholders again at every step and keeps the input's own mask.
        if outputs.cache is not None and outputs.attention_mask is not None:
            model_kwargs["attention_mask"] = outputs.attention_mask
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                           num_new_tokens)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None,
                                      **model_kwargs):
        # Crops are listed over the whole batch, not per row: repeat each sample's own crops (beam search).
        per_crop_inputs = {key: model_kwargs.pop(key) for key in ("pixel_values", "patch_positions")
                           if model_kwargs.get(key) is not None}
        if expand_size > 1 and per_crop_inputs:
            counts = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
            for key, value in per_crop_inputs.items():
                chunks = value.split(counts)
                per_crop_inputs[key] = torch.cat([chunk for chunk in chunks for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder,
                                                                        input_ids, **model_kwargs)
        return input_ids, {**model_kwargs, **per_crop_inputs}
