"""Tiny LLaVA-1.5 / LLaVA-NeXT / InternVL models built from the stock transformers classes, with their own tokenizer.

    from mmreduce.eval.tiny_models import load_tiny, prompt_for
    model, processor = load_tiny("tiny-llava-shapes")          # bundled checkpoint, offline
    inputs = processor(images=[image], text=[prompt_for(processor, question)], return_tensors="pt")

Four recipes are registered in `TINY_MODELS`:

- `tiny-llava-shapes`: `LlavaForConditionalGeneration`, CLIP tower on 128 px images with 8 px patches
  (16 x 16 = 256 vision tokens, CLS dropped) + an 8-layer Llama; trained on `shapes`. (576 tokens would
  triple the training cost on two CPU cores.)
- `tiny-llava-next-docs`: `LlavaNextForConditionalGeneration` (anyres): 64 px crops with 16 px patches
  (16 tokens per crop), pinpoints 128x128 / 192x128 / 128x192, plus the base image and one newline token per
  row (a 128 px page: 16 base + 64 grid + 8 newlines = 88 vision tokens); trained on `docs`.
- `tiny-internvl-docs`: `InternVLForConditionalGeneration`: 64 px tiles (GotOcr2 `crop_to_patches`, at most 4,
  plus a thumbnail of the whole page when there is more than one) through an InternViT-style tower with 8 px
  patches, pixel shuffle 0.5 (16 tokens per tile, each from a 16 px square) and a Qwen2 text model (a 128 px page:
  4 tiles + thumbnail = 80 vision tokens between `<img>` and `</img>`); trained on `docs`.
- `tiny-llava-video`: `LlavaForConditionalGeneration` reading a clip as 4 frames, one `<image>` per frame: CLIP
  tower on 96 px frames with 12 px patches (8 x 8 = 64 tokens per frame, 256 per clip) + the same Llama; trained on
  `video`.

The tokenizer is a `tokenizers` WordLevel model over a closed vocabulary (question and answer words of all the
benchmarks, the prompt words, and the special tokens `<pad> <s> </s> <unk> <image>`), wrapped in
`PreTrainedTokenizerFast`, left padding (InternVL's adds `<img> </img> <video>` after the words; `<image>` is its
context token). Answers are single words, so greedy decoding gives `answer </s>`.
Each checkpoint's processor carries its chat template, which fixes where the images go (the shipped ones put the
question first); `prompt_for` builds prompts from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from mmreduce import checkpoints
from mmreduce.adapters import model_class_for
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = [
    "CHECKPOINT_ALIASES",
    "CHECKPOINT_DIR",
    "DOCS_VOCABULARY",
    "INTERNVL_TOKENS",
    "PROMPT",
    "PROMPT_QUESTION_FIRST",
    "SPECIAL_TOKENS",
    "TINY_MODELS",
    "TinyVLMConfig",
    "VOCABULARY",
    "build_processor",
    "build_tiny",
    "build_tokenizer",
    "format_prompt",
    "load_tiny",
    "prompt_for",
    "recipe_name",
    "resolve_checkpoint",
    "save_tiny",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"

#: Other names of shipped folders. The shipped `tiny-llava-shapes` is its third version; the earlier two ship as
#: their own folders (`tiny-llava-shapes-v1`, `-v2`), so every version has a name without storing v3 twice.
CHECKPOINT_ALIASES = {"tiny-llava-shapes-v3": "tiny-llava-shapes"}

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
#: LLaVA-1.5's conversation format; `{images}` is one "<image>\n" per image.
PROMPT = "USER: {images}{question} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
#: The same turn with the question before the images, so that the image tokens can read it (causal attention):
#: `USER: {question}\n<image>\n ASSISTANT:`. A model trained this way ships this template in its processor.
PROMPT_QUESTION_FIRST = "USER: {question}\n{images} ASSISTANT:"
CHAT_TEMPLATE_QUESTION_FIRST = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

# Every word the benchmarks' questions and answers use (shapes, docs, video), plus the prompt words. Listed,
# not harvested from samples, so the vocabulary (and so the token ids) can never drift with a generator.
_WORDS = """
USER ASSISTANT : ?
what color is the shape object there a how many objects are where relative to of which way does move turn when
appear next mark digit
red green blue yellow purple cyan circle square triangle cross yes no one two three
left right above below up down start middle end 0 1 2 3 4 5 6 7 8 9
"""
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split()))
# Words added after `tiny-llava-shapes` was trained go last, so the shapes vocabulary (and its token ids and
# initialisation) stays a prefix and the shipped checkpoint stays reproducible.
DOCS_VOCABULARY: tuple[str, ...] = (*VOCABULARY, "in", "box", "with")
#: InternVL's image start / end and video tokens, special tokens after the words (so the other recipes' ids stay as
#: they are). `<image>` is InternVL's context token: the processor turns each one in a prompt into
#: `<img>` + `<image>` x (16 x tiles) + `</img>`.
INTERNVL_TOKENS: tuple[str, ...] = ("<img>", "</img>", "<video>")
#: InternVL's pixel shuffle: every 2 x 2 block of patches becomes one token.
INTERNVL_DOWNSAMPLE = 0.5


@dataclass
class TinyVLMConfig:
    """Recipe of one tiny VLM.

    - arch: "llava" (LLaVA-1.5), "llava_next" (anyres) or "internvl" (tiles + thumbnail, pixel shuffle, Qwen2).
    - benchmark: the benchmark it is trained on; benchmark_options: its generator options.
    - image_size, patch_size: vision input side and patch side (per crop for llava_next, per tile for internvl).
    - words: the tokenizer's closed vocabulary (after the special tokens).
    - vision_*: CLIP tower width / depth / heads; text_*: Llama width / depth / heads / kv heads / MLP width.
    - grid_pinpoints: anyres resolutions as [height, width] (llava_next only).
    - question_first: the prompt puts the question before the images (`PROMPT_QUESTION_FIRST`), so the image
      tokens can condition on it; otherwise LLaVA-1.5's order (images first).
    - max_tiles: most tiles per image (internvl only; a thumbnail is added when there is more than one).
    - frames: images per sample, one `<image>` each (the `video` benchmark's `frames_per_sample`); 1 otherwise.
    """

    name: str
    arch: str = "llava"
    benchmark: str = "shapes"
    benchmark_options: dict = field(default_factory=dict)
    image_size: int = 128
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 256
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    words: tuple[str, ...] = VOCABULARY
    question_first: bool = False
    max_tiles: int = 0
    frames: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ("llava", "llava_next", "internvl"):
            raise ValueError(f"arch must be 'llava', 'llava_next' or 'internvl', got {self.arch!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size!r} must be a multiple of patch_size={self.patch_size!r}")
        for name in ("vision_hidden", "text_hidden"):
            heads = self.vision_heads if name.startswith("vision") else self.text_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)!r} must be divisible by its head count {heads}")
        if self.text_heads % self.text_kv_heads:
            raise ValueError(f"text_heads={self.text_heads} must be a multiple of text_kv_heads={self.text_kv_heads!r}")
        if self.text_layers < 1 or self.vision_layers < 1:
            raise ValueError(f"need at least one layer, got text_layers={self.text_layers!r}, "
                             f"vision_layers={self.vision_layers!r}")
        if self.frames < 1 or self.benchmark_options.get("frames_per_sample", self.frames) != self.frames:
            raise ValueError(f"frames={self.frames!r} must be >= 1 and equal benchmark_options' frames_per_sample")
        if self.arch == "llava_next" and not self.grid_pinpoints:
            raise ValueError("grid_pinpoints must be given for arch='llava_next'")
        if self.arch == "internvl" and (self.max_tiles < 1 or (self.image_size // self.patch_size) % 2):
            raise ValueError(f"arch='internvl' needs max_tiles >= 1 and an even number of patches per side (pixel "
                             f"shuffle), got max_tiles={self.max_tiles!r}, image_size / patch_size = "
                             f"{self.image_size // self.patch_size}")

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens per image (per crop for llava_next, per tile for internvl): (image_size / patch_size)^2,
        CLS dropped; for internvl a quarter of it (pixel shuffle)."""
        side = self.image_size // self.patch_size
        return (side // 2) ** 2 if self.arch == "internvl" else side ** 2

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special tokens after the words (`build_tokenizer`'s `extra`)."""
        return INTERNVL_TOKENS if self.arch == "internvl" else ()


TINY_MODELS: dict[str, TinyVLMConfig] = {
    "tiny-llava-shapes": TinyVLMConfig(name="tiny-llava-shapes", benchmark="shapes",
                                       image_size=128,
                                       benchmark_options=dict(image_size=128)),
    "tiny-llava-next-docs": TinyVLMConfig(
        name="tiny-llava-next-docs", arch="llava_next", benchmark="docs", image_size=64, patch_size=16,
        grid_pinpoints=((128, 128), (192, 128), (128, 192)),
        benchmark_options=dict(page_sizes=((128, 128),)), words=DOCS_VOCABULARY,
    ),
    "tiny-internvl-docs": TinyVLMConfig(
        name="tiny-internvl-docs", arch="internvl", benchmark="docs", image_size=64, patch_size=8, max_tiles=4,
        benchmark_options=dict(page_sizes=((128, 128),)), words=DOCS_VOCABULARY,
    ),
    # The video words are part of VOCABULARY: the tokenizer is tiny-llava-shapes' one.
    "tiny-llava-video": TinyVLMConfig(
        name="tiny-llava-video", benchmark="video", image_size=96, patch_size=12, frames=4,
        benchmark_options=dict(size=96, frames_per_sample=4),
    ),
}


def format_prompt(question: str, num_images: int = 1, question_first: bool = False) -> str:
    """The prompt for `question` with `num_images` image placeholders, answered after "ASSISTANT:"."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images!r}")
    template = PROMPT_QUESTION_FIRST if question_first else PROMPT
    return template.format(images="<image>\n" * num_images, question=question)


def prompt_for(processor, question: str, num_images: int = 1) -> str:
    """The prompt in the checkpoint's own format: its processor's chat template decides where the images go.

    A processor without a template gets LLaVA-1.5's order (`format_prompt`).
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images!r}")
    if not getattr(processor, "chat_template", None):
        return format_prompt(question, num_images)
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def build_tokenizer(words: tuple[str, ...] = VOCABULARY, extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over `SPECIAL_TOKENS + words` (+ the special tokens `extra` last); prepends `<s>`; left
    padding. With `extra = INTERNVL_TOKENS` it names them as InternVL's processor reads them (`<image>` is the
    context token)."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words, *extra]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs: "USER:" -> "USER", ":"
    backend.add_special_tokens([*SPECIAL_TOKENS, *extra])  # matched before pre-tokenization: "<image>" stays whole
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    named = {"image_token": "<image>"}
    if extra:
        if tuple(extra) != INTERNVL_TOKENS:
            raise ValueError(f"extra special tokens must be {INTERNVL_TOKENS!r} (InternVL's) or none, got {extra!r}")
        named.update(context_image_token="<image>", start_image_token="<img>", end_image_token="</img>",
                     video_token="<video>")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=named, padding_side="left", model_max_length=4096,
    )


def build_processor(cfg: TinyVLMConfig, tokenizer: PreTrainedTokenizerFast | None = None):
    """`LlavaProcessor` (CLIP image processor), `LlavaNextProcessor` (anyres image processor) or `InternVLProcessor`
    (GotOcr2 image processor cropping to at most `max_tiles` tiles + a thumbnail)."""
    chat_template = CHAT_TEMPLATE_QUESTION_FIRST if cfg.question_first else CHAT_TEMPLATE
    if cfg.arch == "internvl":
        tokenizer = tokenizer or build_tokenizer(cfg.words, cfg.special_tokens)
        size = {"height": cfg.image_size, "width": cfg.image_size}
        image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1,
                                                max_patches=cfg.max_tiles)
        return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=InternVLVideoProcessor(size=size),
                                 image_seq_length=cfg.tokens_per_image, chat_template=chat_template)
    tokenizer = tokenizer or build_tokenizer()
    common = dict(size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size})
    if cfg.arch == "llava":
        image_processor = CLIPImageProcessor(**common)
        cls = LlavaProcessor
    else:
        image_processor = LlavaNextImageProcessor(**common, image_grid_pinpoints=[list(p) for p in cfg.grid_pinpoints])
        cls = LlavaNextProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
               vision_feature_select_strategy="default", num_additional_image_tokens=1,
               chat_template=CHAT_TEMPLATE_QUESTION_FIRST if cfg.question_first else CHAT_TEMPLATE)


def _text_config_fields(cfg: TinyVLMConfig, tokenizer: PreTrainedTokenizerFast) -> dict:
    """The language model's sizes and special ids, the same for the Llama (LLaVA) and Qwen2 (InternVL) recipes."""
    return dict(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                num_key_value_heads=cfg.text_kv_heads, max_position_embeddings=2048,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def _model_config(cfg: TinyVLMConfig, tokenizer: PreTrainedTokenizerFast):
    if cfg.arch == "internvl":
        return _internvl_config(cfg, tokenizer), InternVLForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = LlamaConfig(**_text_config_fields(cfg, tokenizer))
    common = dict(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    if cfg.arch == "llava":
        return LlavaConfig(**common), LlavaForConditionalGeneration
    return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in cfg.grid_pinpoints]), \
        LlavaNextForConditionalGeneration


def _internvl_config(cfg: TinyVLMConfig, tokenizer: PreTrainedTokenizerFast) -> InternVLConfig:
    """InternViT-style tower (CLS dropped, pixel shuffle 0.5, LayerNorm + 2-layer MLP projector) and Qwen2."""
    vision = InternVLVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                  image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = Qwen2Config(**_text_config_fields(cfg, tokenizer))
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                          image_seq_length=cfg.tokens_per_image, downsample_ratio=INTERNVL_DOWNSAMPLE,
                          projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


def build_tiny(name_or_cfg: str | TinyVLMConfig, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised (model, processor) pair for a registered name or a `TinyVLMConfig`."""
    cfg = _recipe(name_or_cfg)
    tokenizer = build_tokenizer(cfg.words, cfg.special_tokens)
    processor = build_processor(cfg, tokenizer)
    config, model_cls = _model_config(cfg, tokenizer)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), processor


def _recipe(name_or_cfg: str | TinyVLMConfig) -> TinyVLMConfig:
    if isinstance(name_or_cfg, TinyVLMConfig):
        return name_or_cfg
    if name_or_cfg not in TINY_MODELS:
        raise ValueError(f"tiny model must be one of {sorted(TINY_MODELS)} or a TinyVLMConfig, got {name_or_cfg!r}")
    return replace(TINY_MODELS[name_or_cfg])


def save_tiny(model, processor, path: str | os.PathLike) -> Path:
    """`save_pretrained` of model (float32 safetensors), processor and tokenizer into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A bundled checkpoint name (`eval/checkpoints/<name>`, or a name of `CHECKPOINT_ALIASES`) or an existing
    directory -> its path."""
    return checkpoints.resolve_checkpoint(name_or_path, CHECKPOINT_DIR, "tiny checkpoint", CHECKPOINT_ALIASES)


def recipe_name(name_or_path: str | os.PathLike) -> str | None:
    """The `TINY_MODELS` recipe a bundled checkpoint was trained from: its folder name, or the name before a `-vN`
    version suffix (`tiny-llava-shapes-v1` -> `tiny-llava-shapes`); None for anything else."""
    name = CHECKPOINT_ALIASES.get(Path(name_or_path).name, Path(name_or_path).name)
    if name in TINY_MODELS:
        return name
    base, _, version = name.rpartition("-v")
    return base if version.isdigit() and base in TINY_MODELS else None


def load_tiny(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load a saved VLM offline: (model in eval mode, processor). Never touches the hub.

    The processor's tokenizer pads on the left whatever the saved processor says: batched generation continues
    every row from its last token. A folder that is not a saved model, or whose weights are incomplete or
    corrupted, is reported with its path.
    """
    from transformers import AutoConfig, AutoProcessor

    path = resolve_checkpoint(name_or_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a saved model (no config.json): give a folder written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path / 'config.json'} cannot be read: {error}") from None
    model_class = model_class_for(config)
    try:
        model = model_class.from_pretrained(path, dtype=dtype, local_files_only=True,
                                            attn_implementation=attn_implementation)
    except Exception as error:  # safetensors, torch and transformers each raise their own kind
        weights = sorted(p.name for p in path.glob("*.safetensors")) or ["no *.safetensors file"]
        reason = " ".join(str(error).split())
        raise ValueError(f"the weights in {path} ({', '.join(weights)}) cannot be loaded: {reason} (the checkpoint "
                         "is incomplete or corrupted: copy or save it again)") from None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"the processor saved in {path} cannot be loaded: {' '.join(str(error).split())} "
                         "(save it with processor.save_pretrained into the same folder)") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return model.eval(), processor
