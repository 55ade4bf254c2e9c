"""Benchmark: prefill + first-token latency and peak memory of CAAS vs no CAAS vs eager attention.

One EAGLE inspection prompt: three images (template, query, boxed query) of 22×22 = 484 visual tokens each
plus ~90 text tokens ≈ 1.54k tokens, answered with ONE generated token (the option letter), so the time is
prefill + first token. Variants, all on the same weights:

- ``sdpa``: no CAAS (the baseline),
- ``caas-logit`` / ``caas-weight`` / ``caas-weight_raw``: the production modes (``mllm.caas.apply_caas``),
- ``eager``: the model switched to eager attention (no CAAS),
- ``eager+caas-logit``: eager attention with the visual logits scaled inside the softmax computation — what the
  paper's reference code does (it monkey-patches eager attention; here an equivalent registered function).

CPU part: a narrow Qwen2.5-VL-shaped model (28 decoder layers of width 256, Qwen's 152k vocabulary, a
small vision tower), random weights, fp32. Peak memory on the CPU is the peak RSS above the pre-call RSS,
sampled every millisecond.

GPU part (only when ``torch.cuda.is_available()``): the full-size Qwen2.5-VL-7B architecture (its config is
written below; the hub is not needed) with random weights, saved once to a temporary folder and loaded in 4-bit
NF4 through the production ``BitsAndBytesConfig`` (``mllm.loading.quantization_config``). Reports peak VRAM
(``torch.cuda.max_memory_allocated``) and the latency per inspected image (one three-image prompt); goals:
≤ 10 GiB and CAAS adding ≤ 3 % latency.

Usage:
    .venv/bin/python bench/caas.py [--repeats 3] [--threads 1] [--skip-cpu] [--skip-gpu]

Writes ``bench/results/caas.json`` (and prints a table).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import machine as bench_machine  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AttentionInterface, AutoModelForImageTextToText, Qwen2_5_VLConfig  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

from mllm.caas import CAASConfig, apply_caas, visual_token_mask  # noqa: E402

# Qwen2.5-VL-7B-Instruct's config.json (hub revision of 2025), the values that shape compute and memory.
QWEN2_5_VL_7B = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "hidden_act": "silu",
        "tokens_per_second": 2,
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

# The narrow CPU stand-in: same layout (28 layers, GQA, M-RoPE, windowed vision tower), width 256.
NARROW = {
    "text_config": {
        **QWEN2_5_VL_7B["text_config"],
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]},
    },
    "vision_config": {
        **QWEN2_5_VL_7B["vision_config"],
        "depth": 4,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_heads": 2,
        "out_hidden_size": 256,
        "fullatt_block_indexes": [3],
    },
    **{key: value for key, value in QWEN2_5_VL_7B.items() if key not in ("text_config", "vision_config")},
}

IMAGES = 3
PATCH_GRID = 44  # 44×44 patches of 14 px = 616×616 px → merged 2×2 → 22×22 = 484 tokens per image
TEXT_TOKENS = 90


def make_prompt(config: Qwen2_5_VLConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic EAGLE prompt: system text, 3 × (vision_start, 484 image tokens, vision_end), question."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(config.text_config.vocab_size, 151643)  # ordinary text ids, below the special tokens

    def text(count: int) -> list[int]:
        return torch.randint(0, vocab, (count,), generator=generator).tolist()

    merge = config.vision_config.spatial_merge_size
    per_image = (PATCH_GRID // merge) ** 2
    ids = text(TEXT_TOKENS // 2)
    for _ in range(IMAGES):
        ids += [config.vision_start_token_id] + [config.image_token_id] * per_image + [config.vision_end_token_id]
        ids += text(4)
    ids += text(TEXT_TOKENS // 2)
    vision = config.vision_config
    channels = vision.in_chans * vision.temporal_patch_size * vision.patch_size**2
    patches = IMAGES * PATCH_GRID * PATCH_GRID
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(patches, channels, generator=generator),
        "image_grid_thw": torch.tensor([[1, PATCH_GRID, PATCH_GRID]] * IMAGES),
    }


# --- the eager variant with the reference code's CAAS (logits scaled inside an explicit softmax) -------------

EAGER_CAAS = "bench_eager_caas_logit"
_EAGER_STATE: dict = {}


def _eager_caas_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if id(module) in _EAGER_STATE.get("modules", ()):
        mask = _EAGER_STATE["mask"]
        visual = torch.zeros(query.shape[0], key.shape[-2], dtype=torch.bool, device=key.device)
        visual[:, : min(mask.shape[1], key.shape[-2])] = mask[:, : key.shape[-2]]
        logits = torch.where(visual[:, None, None, :], logits * _EAGER_STATE["factor"], logits)
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(EAGER_CAAS, _eager_caas_attention)
AttentionMaskInterface.register(EAGER_CAAS, eager_mask)


@contextlib.contextmanager
def attention_implementation(model, name: str, state: dict | None = None) -> Iterator[None]:
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": name})
    _EAGER_STATE.update(state or {})
    try:
        yield
    finally:
        _EAGER_STATE.clear()
        model.set_attn_implementation({"text_config": previous})


def variants(model, layers, mask) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    caas = CAASConfig()  # paper defaults: α = 0.6, layers 9..15, all visual tokens
    eager_state = {
        "modules": {id(layers[i].self_attn) for i in caas.layers},
        "mask": mask,
        "factor": caas.factor,
    }
    return {
        "sdpa": contextlib.nullcontext,
        "caas-logit": lambda: apply_caas(model, layers, CAASConfig(mode="logit"), mask),
        "caas-weight": lambda: apply_caas(model, layers, CAASConfig(mode="weight"), mask),
        "caas-weight_raw": lambda: apply_caas(model, layers, CAASConfig(mode="weight_raw"), mask),
        "eager": lambda: attention_implementation(model, "eager"),
        "eager+caas-logit": lambda: attention_implementation(model, EAGER_CAAS, eager_state),
    }


# --- measurement ----------------------------------------------------------------------------------------------


class RssPeak:
    """Samples this process's RSS every millisecond; ``peak`` is the maximum above the value at start.

    Meaningful because glibc's mmap threshold is fixed first (:func:`_fix_mmap_threshold`: large tensors are
    mmapped and returned to the system when freed) and the heap is trimmed before each measurement.
    """

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> RssPeak:
        _trim_heap()
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _fix_mmap_threshold() -> None:
    """Stop glibc from raising its mmap threshold, so freed large buffers leave the RSS (M_MMAP_THRESHOLD = -3)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _answer_once(model, inputs, context: Callable, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``generate(max_new_tokens=1)``: the prefill plus the first (answer) token.

    On a shared CPU host the CPU seconds are the fairer comparison (other jobs stretch the wall time).
    """
    with context(), torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def _peak_memory(model, inputs, context: Callable, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _answer_once(model, inputs, context, device)
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    with RssPeak() as rss:
        _answer_once(model, inputs, context, device)
    return {"peak_rss_above_start_mib": (rss.peak - rss.start) / 2**20}


def run_variants(model, inputs, repeats: int, device: torch.device, label: str) -> dict[str, dict]:
    """Warm each variant up once, then time them interleaved (round-robin, so load drift hits all alike)."""
    from tqdm import tqdm

    layers = model.model.language_model.layers
    mask = visual_token_mask(inputs["input_ids"], model.config.image_token_id)
    contexts = variants(model, layers, mask)
    for context in contexts.values():
        _answer_once(model, inputs, context, device)
    walls: dict[str, list[float]] = {name: [] for name in contexts}
    cpus: dict[str, list[float]] = {name: [] for name in contexts}
    for _ in tqdm(range(repeats), desc=f"{label}: timing rounds", unit="round"):
        for name, context in contexts.items():
            wall, cpu = _answer_once(model, inputs, context, device)
            walls[name].append(wall)
            cpus[name].append(cpu)
    if device.type == "cpu":
        _fix_mmap_threshold()
    results = {}
    for name, context in contexts.items():
        results[name] = {
            "latency_s_median": statistics.median(walls[name]),
            "latency_s_all": walls[name],
            "cpu_s_median": statistics.median(cpus[name]),
            **_peak_memory(model, inputs, context, device),
        }
    base, base_cpu = results["sdpa"]["latency_s_median"], results["sdpa"]["cpu_s_median"]
    for result in results.values():
        result["overhead_vs_sdpa_pct"] = 100.0 * (result["latency_s_median"] / base - 1.0)
        result["cpu_overhead_vs_sdpa_pct"] = 100.0 * (result["cpu_s_median"] / base_cpu - 1.0)
    return results


def cpu_part(repeats: int) -> dict:
    config = Qwen2_5_VLConfig(**NARROW)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    inputs = make_prompt(config)
    results = run_variants(model, inputs, repeats, torch.device("cpu"), "cpu")
    return {
        "model": "narrow Qwen2.5-VL (28 layers × 256, vision depth 4 × 128), random weights, fp32",
        "parameters_million": sum(p.numel() for p in model.parameters()) / 1e6,
        "sequence_tokens": int(inputs["input_ids"].shape[1]),
        "visual_tokens": int((inputs["input_ids"] == config.image_token_id).sum()),
        "results": results,
    }


def gpu_part(repeats: int, config_values: dict = QWEN2_5_VL_7B, device: str = "cuda") -> dict:
    """Full-size Qwen2.5-VL-7B, random weights, loaded in 4-bit NF4 through the production quantisation config."""
    from eagle.settings import MLLMSettings
    from mllm.loading import quantization_config
    from mllm.presets import get_preset

    target = torch.device(device)
    config = Qwen2_5_VLConfig(**config_values)
    settings = MLLMSettings(quantization="4bit", device=device)
    bnb_config = quantization_config(settings, target, get_preset("qwen2.5-vl-7b"))
    with tempfile.TemporaryDirectory(prefix="eagle-bench-qwen7b-") as folder:
        torch.manual_seed(0)
        with torch.device(target):  # random init where it is fast
            full = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        full.save_pretrained(folder)
        del full
        gc.collect()
        if target.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(target)
        model = AutoModelForImageTextToText.from_pretrained(
            folder,
            dtype=torch.bfloat16,
            quantization_config=bnb_config,
            attn_implementation="sdpa",
            device_map={"": str(target)},
        ).eval()
    weights_gib = torch.cuda.memory_allocated(target) / 2**30 if target.type == "cuda" else None
    inputs = {key: value.to(target) for key, value in make_prompt(config).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    results = run_variants(model, inputs, repeats, target, device)
    return {
        "model": "Qwen2.5-VL-7B architecture, random weights, 4-bit NF4 (bf16 compute, double quant), SDPA",
        "device_name": torch.cuda.get_device_name(target) if target.type == "cuda" else platform.processor(),
        "weights_gib": weights_gib,
        "sequence_tokens": int(inputs["input_ids"].shape[1]),
        "latency_is_per_inspected_image": "one three-image prompt per inspected image; max_new_tokens=1",
        "goals": {"peak_vram_gib_max": 10.0, "caas_overhead_pct_max": 3.0},
        "results": results,
    }


def device_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": bench_machine.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "cuda_available": torch.cuda.is_available(),
    }
    import transformers

    info["transformers"] = transformers.__version__
    with contextlib.suppress(ImportError):
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = properties.name
        info["gpu_memory_gib"] = properties.total_memory / 2**30
    return info


def table(title: str, results: dict[str, dict]) -> str:
    memory_key = next(key for key in next(iter(results.values())) if key.startswith("peak_"))
    lines = [
        f"\n{title}",
        f"| variant | wall s (median) | vs sdpa | CPU s (median) | vs sdpa | {memory_key} |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['latency_s_median']:.3f} | {result['overhead_vs_sdpa_pct']:+.1f} % "
            f"| {result['cpu_s_median']:.3f} | {result['cpu_overhead_vs_sdpa_pct']:+.1f} % "
            f"| {result[memory_key]:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the CPU part")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "caas.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    report: dict = {"benchmark": "caas", "device": device_info(), "caas": vars(CAASConfig())}
    if not args.skip_cpu:
        report["cpu"] = cpu_part(args.repeats)
        print(
            table(f"CPU: {report['cpu']['model']}, {report['cpu']['sequence_tokens']} tokens", report["cpu"]["results"])
        )
    if torch.cuda.is_available() and not args.skip_gpu:
        report["gpu"] = gpu_part(args.repeats)
        print(table(f"GPU: {report['gpu']['device_name']}", report["gpu"]["results"]))
    else:
        report["gpu"] = "not measured: no CUDA GPU on this host" if not torch.cuda.is_available() else "skipped"
        print(f"\nGPU: {report['gpu']}")
    report["device"]["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
