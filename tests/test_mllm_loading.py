"""load_mllm: the production loading path, exercised on the tiny offline models through model_id=<dir>."""

from __future__ import annotations

import logging

import huggingface_hub.constants
import pytest
import torch

from eagle.settings import MLLMSettings
from mllm.loading import LoadedMLLM, MLLMLoadError, load_mllm, quantization_config, resolve_quantization
from mllm.presets import get_preset

torch.set_num_threads(1)
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("fixture", "preset", "token"),
    [("tiny_qwen_dir", "qwen2.5-vl-7b", "<|image_pad|>"), ("tiny_llava_dir", "llava-1.5-7b", "<image>")],
)
def test_loads_tiny_models_frozen_in_fp32_on_cpu(fixture, preset, token, request, caplog):
    directory = request.getfixturevalue(fixture)
    steps = []
    with caplog.at_level(logging.WARNING, logger="mllm.loading"):
        settings = MLLMSettings(preset=preset, model_id=str(directory))
        loaded = load_mllm(settings, progress=lambda stage, fraction: steps.append(fraction))
    assert isinstance(loaded, LoadedMLLM)
    assert loaded.model_id == str(directory.resolve())
    assert (loaded.quantization, loaded.device, loaded.dtype) == ("fp32", CPU, torch.float32)
    assert "fp32 on the CPU" in caplog.text and "slower than fp32" in caplog.text
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.model.parameters())
    assert loaded.image_token_id == loaded.tokenizer.convert_tokens_to_ids(token)
    assert loaded.decoder_layers is loaded.model.model.language_model.layers and len(loaded.decoder_layers) == 16
    assert loaded.model.config._attn_implementation == "sdpa"
    assert steps == sorted(steps) and steps[-1] == 1.0
    assert loaded.preset.name == preset


def test_pixel_budget_from_settings_reaches_the_processor(tiny_qwen_dir):
    loaded = load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir), max_pixels=28 * 28 * 9))
    assert loaded.max_pixels == 28 * 28 * 9
    assert loaded.processor.image_processor.size["longest_edge"] == 28 * 28 * 9


def test_missing_local_directory(tmp_path):
    with pytest.raises(MLLMLoadError, match="does not exist") as err:
        load_mllm(MLLMSettings(model_id=str(tmp_path / "nowhere")))
    assert "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(MLLMLoadError, match="not a model directory"):
        load_mllm(MLLMSettings(model_id=str(tmp_path)))


def test_offline_hub_id_without_cache_says_how_to_get_weights(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HOME once at import: set both the env and the parsed constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MLLMLoadError) as err:
        load_mllm(MLLMSettings(preset="qwen2.5-vl-3b"))
    message = str(err.value)
    assert "\n" not in message
    assert "hf download Qwen/Qwen2.5-VL-3B-Instruct" in message
    assert "EAGLE_MLLM__MODEL_ID" in message


def test_minicpm_refused_without_opt_in(tiny_qwen_dir):
    with pytest.raises(MLLMLoadError, match="EAGLE_MLLM__TRUST_REMOTE_CODE=true"):
        load_mllm(MLLMSettings(preset="minicpm-v-4.5", model_id=str(tiny_qwen_dir)))


def test_unknown_preset_is_a_load_error():
    with pytest.raises(MLLMLoadError, match="known presets: qwen2.5-vl-7b"):
        load_mllm(MLLMSettings(preset="nope"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only host")
def test_cuda_requested_without_cuda(tiny_qwen_dir):
    with pytest.raises(MLLMLoadError, match="CUDA is not available"):
        load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir), device="cuda"))


def test_bad_device_string(tiny_qwen_dir):
    with pytest.raises(MLLMLoadError, match="not a device|not supported"):
        load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir), device="tpu9"))


def test_quantization_config_4bit_is_nf4_double_quant_bf16():
    preset = get_preset("qwen2.5-vl-7b")
    config = quantization_config(MLLMSettings(quantization="auto"), CUDA, preset)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.llm_int8_skip_modules == ["model.visual", "lm_head"]
    assert quantization_config(MLLMSettings(quantization="4bit"), CPU).bnb_4bit_quant_type == "nf4"


def test_quantization_config_other_modes():
    eight = quantization_config(MLLMSettings(quantization="8bit"), CUDA)
    assert eight.load_in_8bit and not eight.load_in_4bit
    for quantization in ("bf16", "fp32"):
        assert quantization_config(MLLMSettings(quantization=quantization), CUDA) is None
    assert quantization_config(MLLMSettings(quantization="auto"), CPU) is None  # auto on CPU = fp32


def test_resolve_quantization_warns_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="mllm.loading"):
        assert resolve_quantization(MLLMSettings(quantization="auto"), CUDA) == "4bit"
        assert caplog.text == ""
        assert resolve_quantization(MLLMSettings(quantization="4bit"), CPU) == "4bit"
    assert "slower than fp32" in caplog.text


def test_explicit_4bit_on_cpu_loads_bitsandbytes_layers(tiny_qwen_dir, caplog):
    import bitsandbytes as bnb

    with caplog.at_level(logging.WARNING, logger="mllm.loading"):
        loaded = load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir), quantization="4bit"))
    assert "slower than fp32" in caplog.text
    assert (loaded.quantization, loaded.dtype) == ("4bit", torch.bfloat16)
    k_proj = loaded.decoder_layers[0].self_attn.k_proj
    assert isinstance(k_proj, bnb.nn.Linear4bit) and k_proj.weight.quant_state.quant_type == "nf4"
    # vision tower and LM head stay un-quantised (bf16)
    assert type(loaded.model.model.visual.blocks[0].attn.qkv) is torch.nn.Linear
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    # NF4 numbers: blocks of 64 weights take at most 16 levels, ~9 % relative error on N(0, 1/64) weights, and
    # the quantised projection's output stays close to the fp32 one
    reference = load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir)))
    exact = reference.decoder_layers[0].self_attn.k_proj
    dequantised = bnb.functional.dequantize_4bit(k_proj.weight.data, k_proj.weight.quant_state).float()
    assert dequantised.shape == exact.weight.shape
    assert max(len(torch.unique(block)) for block in dequantised.flatten().reshape(-1, 64)) <= 16
    assert ((dequantised - exact.weight).norm() / exact.weight.norm()).item() < 0.12
    x = torch.randn(5, exact.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out4, out32 = k_proj(x.bfloat16()).float().flatten(), exact(x).flatten()
    assert torch.nn.functional.cosine_similarity(out4, out32, dim=0) > 0.99
