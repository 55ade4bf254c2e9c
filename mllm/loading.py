"""The one place that loads a multimodal LLM: preset → weights → processor → :class:`LoadedMLLM`.

Quantisation (``settings.mllm.quantization``):

- ``auto``: 4-bit NF4 (bf16 compute, double quantisation; bitsandbytes) on CUDA; fp32 on a CPU-only host,
  with a warning — bitsandbytes 4-bit runs on CPU but is slower there than fp32 (measured).
- ``4bit`` / ``8bit``: bitsandbytes; on CPU they work but warn (slow).
- ``bf16`` / ``fp32``: plain weights.

``settings.mllm.model_id`` may be a hub id or a local directory (the tests load their tiny models this way);
without it the preset's hub id is used. ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself; every
failure to find weights becomes an :class:`MLLMLoadError` with one line saying how to get them.

:func:`load_mllm_from_config` loads a model from a transformers configuration instead (e.g. the preset checkpoint's
published ``config.json``, kept in ``mllm/configs``: :func:`published_config`) with random weights, through the same
``from_pretrained`` call and quantisation: speed and memory of the real model without its weights.

Example:
    >>> from mllm.config import MLLMSettings
    >>> loaded = load_mllm(MLLMSettings(model_id="/models/tiny-qwen"))  # doctest: +SKIP
    >>> loaded.image_token_id, len(loaded.decoder_layers)  # doctest: +SKIP
    (314, 16)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.progress import ProgressCallback
from mllm.caas import CAASConfig, CAASError, CAASLayoutError, check_caas_support
from mllm.config import CAASSettings, MLLMSettings, Quantization
from mllm.errors import MLLMError
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
    "load_mllm_from_config",
    "model_source",
    "published_config",
    "published_config_path",
    "quantization_config",
    "random_state_dict",
    "resolve_device",
    "resolve_quantization",
]

logger = logging.getLogger(__name__)


class MLLMLoadError(MLLMError, RuntimeError):
    """The model could not be loaded; the message is one line that says what to do."""

    code = "mllm_unavailable"


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


def model_source(settings: MLLMSettings) -> tuple[str, ModelPreset]:
    """What :func:`load_mllm` would load for these settings, without loading it: ``(model id, preset)``.

    The model id is a resolved local directory (``settings.model_id`` naming a folder with ``config.json``) or a
    hub id (``settings.model_id``, else the preset's).

    Raises:
        MLLMLoadError: unknown preset, remote code not allowed, or a local path that is not a model directory.
    """
    try:
        preset = get_preset(settings.preset, trust_remote_code=settings.trust_remote_code)
    except PresetError as err:
        raise MLLMLoadError(str(err)) from None
    return _resolve_model_id(settings, preset), preset


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
        progress: Optional ``progress(stage, fraction)`` callback (:class:`common.progress.ProgressCallback`);
            front ends render it.
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
    return _finish_loading(
        model,
        processor,
        preset=preset,
        model_id=model_id,
        quantization=quantization,
        device=device,
        dtype=dtype,
        settings=settings,
        caas=caas,
        progress=progress,
    )


def _finish_loading(
    model: Any,
    processor: Any,
    *,
    preset: ModelPreset,
    model_id: str,
    quantization: Quantization,
    device: torch.device,
    dtype: torch.dtype,
    settings: MLLMSettings,
    caas: CAASSettings | None,
    progress: ProgressCallback | None,
) -> LoadedMLLM:
    """Freeze ``model``, give ``processor`` the pixel budget, find the image token and decoder layers, check CAAS."""
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


# --- a model from its configuration: random weights, the production quantisation -----------------------------

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
"""Published ``config.json`` files of preset checkpoints, one per hub id (:func:`published_config`)."""

_INIT_STD = 0.02  # Qwen2.5-VL's initializer_range: the scale of the random weights


def published_config_path(preset: ModelPreset) -> Path:
    """Where the preset checkpoint's published ``config.json`` is kept: ``mllm/configs/<hub name>.json``.

    The file name is the hub id's model name, lower-cased, with ``.`` and ``-`` as ``_``
    (``Qwen/Qwen2.5-VL-7B-Instruct`` → ``qwen2_5_vl_7b_instruct.json``).
    """
    stem = preset.hub_id.rsplit("/", 1)[-1].lower().replace(".", "_").replace("-", "_")
    return CONFIGS_DIR / f"{stem}.json"


def published_config(preset_name: str) -> Any:
    """The transformers configuration of a preset's checkpoint, from the copy in ``mllm/configs`` (no hub access).

    Raises:
        MLLMLoadError: unknown preset, or no configuration of it is kept in the repository.
    """
    from transformers import AutoConfig

    try:
        preset = get_preset(preset_name)
    except PresetError as err:
        raise MLLMLoadError(str(err)) from None
    path = published_config_path(preset)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))) or "none"
        raise MLLMLoadError(f"no published configuration of preset {preset.name!r} is kept (known: {known})")
    return AutoConfig.from_pretrained(str(path))


def random_state_dict(config: Any, dtype: torch.dtype, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every parameter of the model ``config`` describes, in ``dtype``, on the CPU.

    Norm weights are 1, biases 0; every other weight is a view into ONE seeded N(0, 0.02²) pool as large as the
    largest weight (at a per-weight offset), so a 7B model's state dict costs ~1 GB of host memory instead of
    16 GB and takes seconds to make. Speed and memory of inference do not depend on the values.

    Args:
        config: A transformers model configuration (an ``AutoModelForImageTextToText`` architecture).
        dtype: The dtype of the tensors (what the loader materialises and, under 4/8-bit, quantises).
        seed: Seed of the pool; the same seed gives the same weights.
    """
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    buffers = {name for name, _ in skeleton.named_buffers()}
    del skeleton
    spread = 4096
    largest = max(math.prod(shape) for shape in shapes.values())
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(largest + spread, generator=generator) * _INIT_STD).to(dtype)
    state: dict[str, torch.Tensor] = {}
    for index, (name, shape) in enumerate(shapes.items()):
        if name in buffers:
            continue
        if len(shape) == 1 and name.endswith("bias"):
            state[name] = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 1:
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            offset = (index * 977) % spread
            state[name] = pool[offset : offset + math.prod(shape)].view(shape)
    return state


def load_mllm_from_config(
    config: Any,
    processor: Any,
    settings: MLLMSettings,
    *,
    caas: CAASSettings | None = None,
    progress: ProgressCallback | None = None,
    seed: int = 0,
) -> LoadedMLLM:
    """Load a model from a transformers configuration instead of a hub id: random weights, production loading.

    For measuring speed and memory where the real weights cannot be had (a GPU host without hub access, CI): the
    weights are :func:`random_state_dict` (nothing is written to disk) and go through the SAME ``from_pretrained``
    as :func:`load_mllm` (of the class ``AutoModelForImageTextToText`` picks for ``config``, in transformers'
    documented form with ``config`` and ``state_dict`` instead of a checkpoint name), with the same device map,
    dtype, attention and ``BitsAndBytesConfig``: under ``4bit``/``8bit`` bitsandbytes quantises every weight as it
    is loaded, and the preset's vision tower and LM head stay un-quantised.
    The processor is the caller's (e.g. one made locally with the checkpoint's vocabulary size); the preset's pixel
    budget and the CAAS check are applied as by :func:`load_mllm`.

    Args:
        config: The model configuration (e.g. :func:`published_config`); ``settings.preset`` must describe it.
        processor: Its processor (tokenizer, image processor, chat template).
        settings: The ``mllm`` settings group (preset, quantization, device, attention, pixel budget).
        caas: As :func:`load_mllm`.
        progress: As :func:`load_mllm`.
        seed: Seed of the random weights.

    Raises:
        MLLMLoadError: unknown preset, bad device, bitsandbytes missing, out of memory, or a configuration that is
            not an image-text-to-text model.
        CAASUnsupportedError: as :func:`load_mllm`.
    """
    try:
        preset = get_preset(settings.preset, trust_remote_code=settings.trust_remote_code)
    except PresetError as err:
        raise MLLMLoadError(str(err)) from None
    device = resolve_device(settings)
    quantization = resolve_quantization(settings, device)
    dtype = _weights_dtype(quantization)
    bnb_config = _bnb_config(quantization, preset)
    if quantization in ("4bit", "8bit"):
        _require_bitsandbytes()

    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    model_id = f"config:{getattr(config, 'name_or_path', '') or config.model_type}"
    try:  # the class AutoModelForImageTextToText picks; its from_pretrained takes a config and no checkpoint name
        model_class: Any = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]  # a lazy mapping: typed loosely
    except KeyError:
        raise MLLMLoadError(f"{model_id} ({type(config).__name__}) is not an image-text-to-text model") from None
    _report(progress, f"Making random weights for {model_id}", 0.05)
    try:
        state_dict = random_state_dict(config, dtype, seed=seed)
    except ValueError as err:
        raise MLLMLoadError(f"cannot build {model_id} as an image-text-to-text model: {_first_line(err)}") from None
    _report(progress, f"Loading {model_id} ({quantization} on {device}, random weights)", 0.2)
    kwargs: dict[str, Any] = {
        "config": config,
        "state_dict": state_dict,
        "dtype": dtype,
        "attn_implementation": settings.attn_implementation,
        "device_map": {"": str(device)},
    }
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
    try:
        model = model_class.from_pretrained(None, **kwargs)
    except torch.OutOfMemoryError:
        estimate = estimate_weight_memory_gib(preset, quantization)
        raise MLLMLoadError(
            f"out of memory loading {model_id} in {quantization} (weights ≈ {estimate} GiB): use "
            "EAGLE_MLLM__QUANTIZATION=4bit or the small preset EAGLE_MLLM__PRESET=qwen2.5-vl-3b"
        ) from None
    except (ImportError, ValueError) as err:
        raise MLLMLoadError(f"cannot load {model_id} in {quantization}: {_first_line(err)}") from None
    finally:
        del state_dict
    return _finish_loading(
        model,
        processor,
        preset=preset,
        model_id=model_id,
        quantization=quantization,
        device=device,
        dtype=dtype,
        settings=settings,
        caas=caas,
        progress=progress,
    )
