"""Tiny random-weight multimodal LLMs built offline, for tests and CPU benchmarks.

Each builder writes a complete Hugging Face model directory — config, random weights (fp32 safetensors), a
tokenizer made in memory (byte-level BPE: the 256-byte alphabet, merges learned from a small fixed corpus of the
inspection prompts, the family's special tokens and chat template), image processor, (Qwen) video processor,
processor and generation config — that loads with ``AutoModelForImageTextToText.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)``, i.e. through the same production path as a hub id
(``mllm.loading.load_mllm`` with ``model_id=<dir>``).

The architectures are the real ones (Qwen2.5-VL, Qwen3-VL — whose attention has per-head ``q_norm``/``k_norm`` —
and LLaVA-1.5), only narrow: 16 decoder layers of width 64 by default, so the paper's CAAS layer range 9..15
exists. Images are kept small: one visual token per 28×28 px in the tiny Qwen2.5-VL (at most 16 per image), per
32×32 px in the tiny Qwen3-VL (at most 16), and always 16 in LLaVA (56×56 crop, 14-px patches).

Example:
    >>> from pathlib import Path
    >>> path = make_tiny_qwen2_5_vl(Path("/tmp/tiny-qwen"))  # doctest: +SKIP
    >>> from transformers import AutoModelForImageTextToText
    >>> model = AutoModelForImageTextToText.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    GenerationConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "LLAVA_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "LLAVA_SPECIAL_TOKENS",
    "TINY_QWEN_MIN_PIXELS",
    "TINY_QWEN_MAX_PIXELS",
    "TINY_QWEN3_MIN_PIXELS",
    "TINY_QWEN3_MAX_PIXELS",
    "TINY_LLAVA_IMAGE_SIZE",
    "QWEN2_5_REGULAR_VOCAB",
    "make_qwen2_5_vl_processor",
    "make_tiny_qwen2_5_vl",
    "make_tiny_qwen3_vl",
    "make_tiny_llava",
]

# Qwen2.5-VL-Instruct's own chat template (from its hub processor), unchanged.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's chat template: per message, all images first, then the texts.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

TINY_QWEN_MIN_PIXELS = 28 * 28
TINY_QWEN_MAX_PIXELS = 112 * 112  # at most 4×4 = 16 visual tokens per image
TINY_QWEN3_MIN_PIXELS = 32 * 32
TINY_QWEN3_MAX_PIXELS = 128 * 128  # Qwen3-VL: 16-px patches merged 2×2, one token per 32×32 px: at most 16 tokens
TINY_LLAVA_IMAGE_SIZE = 56  # 4×4 patches of 14 px = 16 visual tokens per image
QWEN2_5_REGULAR_VOCAB = 151643  # Qwen2.5(-VL)'s ordinary tokens; its special tokens start at this id


# A small English corpus (the inspection prompts' vocabulary) the tiny tokenizer's BPE merges are learned from, so
# prompts are ~5× shorter than raw bytes. Fixed text and a deterministic trainer: the same tokenizer every time.
_CORPUS = (
    "You are my industrial image inspection assistant. You will receive multiple images simultaneously, including a "
    "template image, a query image, and a query image with red bounding boxes. Based on the input images and the "
    "accompanying textual information, answer the given question. The question is multiple-choice. Respond only "
    "with the letter of the correct option (e.g., A, B, C, or D). Do not include explanations or extra text.",
    "The query image is predicted as anomalous. The position of the red bounding box on the query image is the "
    "predicted defect location.",
    "The query image is predicted as normal.",
    "Answer with the option's letter from the given choices directly!",
    "Is there any defect in the object?",
    "A. Yes",
    "B. No",
    "Now explain your answer in 2-3 short sentences of plain text: name the type of defect, where it is on the "
    "object in the query image, and its most likely cause. Say which parts of the object you compared with the "
    "template image and why the query image looks normal.",
)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: the 256-symbol byte alphabet plus merges learned from :data:`_CORPUS`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(list(_CORPUS) * 3, trainer)
    model = json.loads(backend.to_str())["model"]
    return dict(model["vocab"]), [tuple(pair) for pair in model["merges"]]


def _round_up(value: int, multiple: int = 64) -> int:
    return (value + multiple - 1) // multiple * multiple


def _seed_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight from N(0, 1/fan_in) (norm weights 1, biases 0): the model is a function of ``seed``.

    Fan-in scaling (not the usual 0.02) keeps activations and logits of order one in a 64-wide model, so greedy
    decoding has clear margins between the top tokens and is not decided by floating-point noise.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.ndim == 1 and "norm" in name and "bias" not in name:
                parameter.fill_(1.0)
            elif parameter.ndim == 1:
                parameter.zero_()
            else:
                fan_in = parameter.numel() // parameter.shape[0]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)


def _qwen_tokenizer(regular_vocab: int | None = None) -> Qwen2Tokenizer:
    vocab, merges = _vocab_and_merges()
    if regular_vocab is not None:
        if regular_vocab < len(vocab):
            raise ValueError(f"regular_vocab must be at least {len(vocab)}, got {regular_vocab}")
        # Filler words no merge produces (" filler<i>": a leading space, as most real tokens, so streamed text flows
        # word by word): they only move the special tokens to the checkpoint's ids.
        vocab.update({f"\u0120filler{i}": i for i in range(len(vocab), regular_vocab)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _save_qwen_model(config, ids: dict[str, int], seed: int, directory: Path) -> None:
    """Build a Qwen-family model from ``config`` with seeded random weights and greedy decoding; save it."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _seed_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(directory)


def make_qwen2_5_vl_processor(
    *, regular_vocab: int | None = None, min_pixels: int = TINY_QWEN_MIN_PIXELS, max_pixels: int = TINY_QWEN_MAX_PIXELS
) -> Qwen2_5_VLProcessor:
    """A Qwen2.5-VL processor made in memory (nothing saved): the tiny tokenizer, image and video processors.

    Args:
        regular_vocab: Ordinary (non-special) tokens of the tokenizer; with :data:`QWEN2_5_REGULAR_VOCAB` the
            vocabulary is padded with filler tokens (never produced from text) so that the special tokens get the
            real checkpoint's ids (``<|endoftext|>`` 151643 … ``<|image_pad|>`` 151655) and a model with the
            published configuration can be driven by it. ``None``: the tiny vocabulary (~500 tokens).
        min_pixels: The image processor's lower pixel bound.
        max_pixels: Its upper pixel bound.
    """
    tokenizer = _qwen_tokenizer(regular_vocab)
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def make_tiny_qwen2_5_vl(directory: Path, *, num_layers: int = 16, hidden: int = 64, seed: int = 0) -> Path:
    """Write a random-weight Qwen2.5-VL with its tokenizer and processors into ``directory``.

    Args:
        directory: Target directory (created; existing files are overwritten).
        num_layers: Decoder layers of the language model.
        hidden: Width of the language model (a multiple of 16: 4 heads of ``hidden // 4``; M-RoPE needs
            ``head_dim // 2`` split into 3 sections).
        seed: Seed of the random weights; the same seed gives the same weights.

    Returns:
        ``directory``, loadable by ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    """
    if hidden % 16:
        raise ValueError(f"hidden must be a multiple of 16, got {hidden}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _round_up(len(tokenizer)),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    _save_qwen_model(config, ids, seed, directory)

    pixels = {"min_pixels": TINY_QWEN_MIN_PIXELS, "max_pixels": TINY_QWEN_MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


def make_tiny_qwen3_vl(directory: Path, *, num_layers: int = 16, hidden: int = 64, seed: int = 0) -> Path:
    """Write a random-weight Qwen3-VL with its tokenizer and processors into ``directory``.

    Unlike Qwen2.5-VL, every decoder attention has per-head RMSNorms ``q_norm`` / ``k_norm`` right after
    ``q_proj`` / ``k_proj`` (the Qwen3 language model of Qwen3-VL, InternVL3.5 and MiniCPM-V 4.5), the vision
    tower uses 16-px patches (one visual token per 32×32 px) and feeds "deepstack" features into the first decoder
    layers. The tokenizer and chat template are the tiny Qwen ones (the image placeholder is the same
    ``<|vision_start|><|image_pad|><|vision_end|>``).

    Args:
        directory: Target directory (created; existing files are overwritten).
        num_layers: Decoder layers of the language model.
        hidden: Width of the language model (a multiple of 16: 4 heads of ``hidden // 4``; interleaved M-RoPE
            splits ``head_dim // 2`` into 3 sections).
        seed: Seed of the random weights; the same seed gives the same weights.

    Returns:
        ``directory``, loadable by ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    """
    if hidden % 16:
        raise ValueError(f"hidden must be a multiple of 16, got {hidden}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    patch = 16
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": _round_up(len(tokenizer)),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": mrope_section,
                "mrope_interleaved": True,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 64,  # a square: an 8×8 learned grid, resampled to each image
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    _save_qwen_model(config, ids, seed, directory)

    size = {"shortest_edge": TINY_QWEN3_MIN_PIXELS, "longest_edge": TINY_QWEN3_MAX_PIXELS}
    common = {"size": size, "patch_size": patch, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=Qwen3VLVideoProcessor(**common),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


def _llava_tokenizer() -> PreTrainedTokenizerFast:
    vocab, merges = _vocab_and_merges()
    for token in LLAVA_SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLAVA_SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def make_tiny_llava(directory: Path, *, num_layers: int = 16, seed: int = 0) -> Path:
    """Write a random-weight LLaVA-1.5 (CLIP tower + Llama decoder) with tokenizer and processor into ``directory``.

    Args:
        directory: Target directory (created; existing files are overwritten).
        num_layers: Decoder layers of the language model (width 64, 4 heads).
        seed: Seed of the random weights.

    Returns:
        ``directory``, loadable by ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _llava_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in LLAVA_SPECIAL_TOKENS}
    patch = 14
    seq_length = (TINY_LLAVA_IMAGE_SIZE // patch) ** 2
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_LLAVA_IMAGE_SIZE,
            "patch_size": patch,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": _round_up(len(tokenizer)),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["<image>"],
        image_seq_length=seq_length,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _seed_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], do_sample=False
    )
    model.save_pretrained(directory)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_LLAVA_IMAGE_SIZE},
        crop_size={"height": TINY_LLAVA_IMAGE_SIZE, "width": TINY_LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


def describe(directory: Path) -> dict:
    """Return the saved config as a dict (handy when debugging a fixture)."""
    return json.loads((Path(directory) / "config.json").read_text())
