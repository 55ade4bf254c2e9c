"""The one place that loads a multimodal LLM: preset → weights → processor → :class:`LoadedMLLM`.

Quantisation (``settings.mllm.quantization``):

- ``auto``: 4-bit NF4 (bf16 compute, double quantisation; bitsandbytes) on CUDA; fp32 on a CPU-only host,
  with a warning — bitsandbytes 4-bit runs on CPU but is slower there than fp32 (DESIGN.md, measured).
- ``4bit`` / ``8bit``: bitsandbytes; on CPU they work but warn (slow).
- ``bf16`` / ``fp32``: plain weights.

``settings.mllm.model_id`` may be a hub id or a local directory (the tests load their tiny models this way);
without it the preset's hub id is used. ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself; every
failure to find weights becomes an :class:`MLLMLoadError` with one line saying how to get them.

Example:
    >>> from mllm.config import MLLMSettings
    >>> loaded = load_mllm(MLLMSettings(model_id="/models/tiny-qwen"))  # doctest: +SKIP
    >>> loaded.image_token_id, len(loaded.decoder_layers)  # doctest: +SKIP
    (314, 16)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from mllm.caas import CAASConfig, CAASError, CAASLayoutError, check_caas_support
from mllm.config import CAASSettings, MLLMSettings
from mllm.presets import (
    ModelPreset,
    PresetError,
    apply_pixel_budget,
    estimate_weight_memory_gib,
    find_decoder_layers,
    find_image_token_id,
    get_preset,
)

__all__ = [
    "CAASUnsupportedError",
    "LoadedMLLM",
    "MLLMLoadError",
    "Quantization",
    "load_mllm",
    "quantization_config",
    "resolve_device",
    "resolve_quantization",
]

logger = logging.getLogger(__name__)

Quantization = Literal["4bit", "8bit", "bf16", "fp32"]


class ProgressCallback(Protocol):
    """``progress(stage, fraction)``: the project's one progress protocol (stage first, fraction in [0, 1]).

    Structurally identical to :class:`expert.progress.ProgressCallback`, which ``mllm`` may not import (the
    packages stay independent): a callback written for either is accepted by both. Here ``stage`` is a
    human-readable step (e.g. ``"Loading processor of <model>"``).
    """

    def __call__(self, stage: str, fraction: float, /) -> None:
        """Report that ``fraction`` of the loading is done, now at ``stage``."""


class MLLMLoadError(RuntimeError):
    """The model could not be loaded; the message is one line that says what to do."""


class CAASUnsupportedError(MLLMLoadError, CAASLayoutError):
    """CAAS is enabled but the loaded model's attention layout (or depth) is not one CAAS supports.

    Both an :class:`MLLMLoadError` (loading failed: callers that fall back to expert-only mode catch it) and a
    :class:`mllm.caas.CAASError`.
    """


@dataclass
class LoadedMLLM:
    """A loaded, frozen multimodal LLM and what the rest of ``mllm/`` needs to drive it.

    Attributes:
        model: The ``AutoModelForImageTextToText`` model, in eval mode, gradients off.
        processor: Its ``AutoProcessor`` (tokenizer, image processor, chat template), pixel budget applied.
        preset: The preset it was loaded for (its hub id may have been overridden by ``model_id``).
        model_id: What was loaded: a hub id or a local directory.
        quantization: The resolved quantisation (never ``auto``).
        device: Where the weights and the inputs live.
        dtype: The dtype of the un-quantised weights and of ``pixel_values`` (bf16 compute under 4/8-bit).
        image_token_id: Token id of visual positions in ``input_ids``.
        decoder_layers: The language model's decoder layers (CAAS and the attention read-out hook here).
        max_pixels: The per-image pixel budget applied to the processor (``None``: fixed-size input).
    """

    model: Any
    processor: Any
    preset: ModelPreset
    model_id: str
    quantization: Quantization
    device: torch.device
    dtype: torch.dtype
    image_token_id: int
    decoder_layers: torch.nn.ModuleList
    max_pixels: int | None = None

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return getattr(self.processor, "tokenizer", self.processor)


def resolve_device(settings: MLLMSettings) -> torch.device:
    """``auto`` → ``cuda:0`` when CUDA is available, else ``cpu``; an explicit CUDA device must exist.

    Raises:
        MLLMLoadError: CUDA requested but not available, or an unparsable device string.
    """
    requested = settings.device.strip().lower()
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MLLMLoadError(
            f"EAGLE_MLLM__DEVICE={settings.device!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MLLMLoadError(f"EAGLE_MLLM__DEVICE={settings.device!r} but CUDA is not available on this host")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise MLLMLoadError(
                f"EAGLE_MLLM__DEVICE={settings.device!r} but this host has only "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise MLLMLoadError(f"EAGLE_MLLM__DEVICE={settings.device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_quantization(settings: MLLMSettings, device: torch.device) -> Quantization:
    """Resolve ``auto`` for ``device`` (4-bit on CUDA, fp32 on CPU) and warn about slow CPU choices."""
    quantization = settings.quantization
    if device.type == "cpu":
        if quantization == "auto":
            logger.warning(
                "No CUDA GPU: loading the MLLM in fp32 on the CPU (bitsandbytes 4-bit runs on CPU but is slower "
                "than fp32 there). Expect tens of seconds per image; a GPU with 8+ GB is recommended."
            )
            return "fp32"
        if quantization in ("4bit", "8bit"):
            logger.warning(
                "%s bitsandbytes weights on the CPU work but are slower than fp32 there; "
                "use EAGLE_MLLM__QUANTIZATION=fp32 (or bf16 to halve memory) on a CPU-only host.",
                quantization,
            )
        else:
            logger.warning("Running the MLLM on the CPU: expect tens of seconds per image.")
        return quantization
    return "4bit" if quantization == "auto" else quantization


def quantization_config(settings: MLLMSettings, device: torch.device, preset: ModelPreset | None = None) -> Any:
    """Return the ``BitsAndBytesConfig`` for the resolved quantisation, or ``None`` for bf16/fp32.

    4-bit: NF4, bf16 compute dtype, double quantisation. 8-bit: LLM.int8. The preset's vision tower,
    projector and LM head stay un-quantised (``llm_int8_skip_modules``).
    """
    return _bnb_config(resolve_quantization(settings, device), preset)


def _bnb_config(quantization: Quantization, preset: ModelPreset | None) -> Any:
    from transformers import BitsAndBytesConfig

    skip = list(preset.quantization_skip_modules) if preset is not None else None
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def _weights_dtype(quantization: Quantization) -> torch.dtype:
    return torch.float32 if quantization == "fp32" else torch.bfloat16


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~", "\\")) or (len(model_id) > 1 and model_id[1] == ":")


def _resolve_model_id(settings: MLLMSettings, preset: ModelPreset) -> str:
    model_id = (settings.model_id or "").strip() or preset.hub_id
    local = Path(model_id).expanduser()
    if local.exists():
        if not (local.is_dir() and (local / "config.json").is_file()):
            raise MLLMLoadError(
                f"EAGLE_MLLM__MODEL_ID={model_id!r} is not a model directory (expected a folder with config.json)"
            )
        return str(local.resolve())
    if _looks_like_path(model_id):
        raise MLLMLoadError(f"local model directory {model_id!r} does not exist (EAGLE_MLLM__MODEL_ID)")
    return model_id


def _how_to_get(model_id: str, reason: str) -> MLLMLoadError:
    return MLLMLoadError(
        f"cannot load MLLM weights {model_id!r} ({reason}): on a connected machine run "
        f"`hf download {model_id}` and copy the Hugging Face cache (~/.cache/huggingface) here, "
        "or set EAGLE_MLLM__MODEL_ID to a local model directory"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _report(progress: ProgressCallback | None, message: str, fraction: float) -> None:
    logger.info(message)
    if progress is not None:
        progress(message, fraction)


def load_mllm(
    settings: MLLMSettings, *, progress: ProgressCallback | None = None, caas: CAASSettings | None = None
) -> LoadedMLLM:
    """Load the preset's (or ``settings.model_id``'s) model and processor, frozen and ready for inference.

    Args:
        settings: The ``mllm`` settings group.
        progress: Optional ``progress(stage, fraction)`` callback (:class:`ProgressCallback`); front ends render it.
        caas: The ``caas`` settings group. Unless its policy is ``off``, the model's decoder layers in the CAAS
            range must have an attention layout CAAS supports (:func:`mllm.caas.check_caas_support`), checked here
            so an unsupported backbone fails at load time instead of running without CAAS. ``None``: no check.

    Returns:
        The :class:`LoadedMLLM`.

    Raises:
        MLLMLoadError: unknown preset, remote code not allowed, weights not found (one line on how to get them),
            bad device, out of memory, or a checkpoint that is not an image-text-to-text model.
        CAASUnsupportedError: CAAS enabled (``caas.policy`` not ``off``) on a model whose attention layout (or
            number of decoder layers) CAAS does not support; also a :class:`mllm.caas.CAASError`.
    """
    try:
        preset = get_preset(settings.preset, trust_remote_code=settings.trust_remote_code)
    except PresetError as err:
        raise MLLMLoadError(str(err)) from None
    model_id = _resolve_model_id(settings, preset)
    device = resolve_device(settings)
    quantization = resolve_quantization(settings, device)
    dtype = _weights_dtype(quantization)
    bnb_config = _bnb_config(quantization, preset)
    if quantization in ("4bit", "8bit"):
        _require_bitsandbytes()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    remote = settings.trust_remote_code and preset.trust_remote_code
    estimate = estimate_weight_memory_gib(preset, quantization)
    _report(progress, f"Loading processor of {model_id}", 0.05)
    try:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=remote)
    except (OSError, ValueError) as err:
        raise _how_to_get(model_id, _first_line(err)) from None
    size_note = f"; weights ≈ {estimate} GiB" if model_id == preset.hub_id else ""
    _report(progress, f"Loading {model_id} ({quantization} on {device}{size_note})", 0.2)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": settings.attn_implementation,
        "device_map": {"": str(device)},
        "trust_remote_code": remote,
    }
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    except torch.OutOfMemoryError:
        raise MLLMLoadError(
            f"out of memory loading {model_id} in {quantization} (weights ≈ {estimate} GiB): use "
            "EAGLE_MLLM__QUANTIZATION=4bit or the small preset EAGLE_MLLM__PRESET=qwen2.5-vl-3b"
        ) from None
    except ImportError as err:
        raise MLLMLoadError(f"cannot load {model_id} in {quantization}: {_first_line(err)}") from None
    except OSError as err:
        raise _how_to_get(model_id, _first_line(err)) from None
    except ValueError as err:
        raise MLLMLoadError(f"cannot load {model_id} as an image-text-to-text model: {_first_line(err)}") from None
    model.eval()
    model.requires_grad_(False)
    _report(progress, "Preparing processor", 0.9)
    apply_pixel_budget(preset, model, processor, settings.max_pixels)
    try:
        image_token_id = find_image_token_id(model, processor, preset)
        decoder_layers = find_decoder_layers(model)
    except PresetError as err:
        raise MLLMLoadError(str(err)) from None
    if caas is not None and caas.policy != "off":
        _check_caas(model, decoder_layers, caas, model_id)
    max_pixels = settings.max_pixels if settings.max_pixels is not None else preset.max_pixels
    _report(progress, f"Loaded {model_id}", 1.0)
    return LoadedMLLM(
        model=model,
        processor=processor,
        preset=preset,
        model_id=model_id,
        quantization=quantization,
        device=device,
        dtype=dtype,
        image_token_id=image_token_id,
        decoder_layers=decoder_layers,
        max_pixels=max_pixels,
    )


def _check_caas(model: Any, decoder_layers: torch.nn.ModuleList, caas: CAASSettings, model_id: str) -> None:
    try:
        check_caas_support(model, decoder_layers, CAASConfig.from_settings(caas))
    except CAASError as err:
        fix = (
            "run it with EAGLE_CAAS__POLICY=off or use a preset whose attention layout CAAS supports"
            if isinstance(err, CAASLayoutError)
            else "or run it with EAGLE_CAAS__POLICY=off"
        )
        raise CAASUnsupportedError(f"{model_id} ({type(model).__name__}) cannot run CAAS: {err}; {fix}") from None


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MLLMLoadError(
            "4-bit/8-bit loading needs bitsandbytes (pip install bitsandbytes), or set EAGLE_MLLM__QUANTIZATION=bf16"
        ) from None
