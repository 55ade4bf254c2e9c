"""The one prepared GPU check: memory and latency of the MLLM, the expert on the GPU, the streamed explanation.

Run it on any CUDA host (``bench/device_check.sh`` on the lent GPU machine, or directly on a workstation); it reaches
no hub and needs no real weights. Stages, in this order, each written to the result file (atomically) as soon as it
ends, so a run cut short by its time limit still leaves the numbers of the stages before:

1. ``environment``: GPU name and memory, driver, CUDA, torch / transformers / bitsandbytes / faiss / onnxruntime.
2. ``mllm_7b_4bit``: Qwen2.5-VL-7B-Instruct built from its published configuration (``mllm/configs``) with random
   weights through :func:`mllm.loading.load_mllm_from_config` — the product's ``from_pretrained`` call and
   ``BitsAndBytesConfig`` (4-bit NF4, quantised as the weights load) — and a processor made locally with the real
   vocabulary size (``tests/tiny_models.py``), so that speed and memory are those of the real weights. One full
   EAGLE query through :class:`mllm.inspector.MLLMInspector` (template, query and boxed query at the preset's pixel
   budget, 8 new tokens) with CAAS off / logit / weight / weight_raw: warm-up, then ``--repeats`` interleaved rounds;
   median latency and peak VRAM per mode. Goals: peak ≤ 10 GiB, each CAAS mode ≤ 3 % over off.
3. ``explanation_7b_4bit``: the streamed explanation (:meth:`MLLMInspector.explain_stream`) on the same model: time to
   the first streamed chunk and tokens per second.
4. ``expert``: the PatchCore expert with the torch CUDA embedder (:class:`expert.embedder.TorchEmbedder` on the GPU):
   the ``--references``-reference build (:func:`expert.build.fit_bank`) and one inspection against it
   (:class:`expert.scorer.ExpertScorer`); the product's ONNX build and inspection (:func:`expert.build.build_bank`,
   :func:`expert.scorer.load_expert`) when onnxruntime has its CUDA provider; faiss on the GPU when the installed
   faiss has GPU support. What is missing is skipped with a note. Goals: inspection ≤ 30 ms, build ≤ 20 s.
5. ``mllm_3b_4bit`` and ``mllm_7b_bf16`` (query latency and peak VRAM, for comparison), only while the soft time
   budget (``--budget-s``) allows.

``--dry-run`` runs the same code on the CPU with the tiny test models (``tests/tiny_models.py``: 16 layers of width
64, tiny vocabulary), 4-bit NF4 replaced by fp32 (bf16 stays bf16), few references and repeats, in well under a
minute; the result says what was substituted. It writes ``device-<date>-dry-run.json``.

Usage::

    python bench/device_check.py                 # CUDA host -> bench/results/device-<date>.json
    python bench/device_check.py --dry-run       # CPU, tiny models, < 1 min
    python bench/device_check.py --repeats 20 --references 200 --budget-s 900
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import machine as bench_machine  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mllm.caas import CAASConfig  # noqa: E402
from mllm.config import CAASSettings, MLLMSettings  # noqa: E402

PACKAGES = ("torch", "transformers", "bitsandbytes", "accelerate", "faiss-cpu", "faiss-gpu-cu12", "onnxruntime",
            "onnxruntime-gpu", "timm", "numpy", "pydantic", "tokenizers", "safetensors")  # fmt: skip
CAAS_MODES = ("off", "logit", "weight", "weight_raw")
GOALS = {
    "mllm_peak_vram_gib_max": 10.0,
    "caas_overhead_pct_max": 3.0,
    "expert_inspection_ms_max": 30.0,
    "expert_build_s_max": 20.0,
}
# Modules the check must never import: the GPU image has none of them (and the check needs none).
FORBIDDEN_MODULES = ("eagle", "app", "deploy", "gradio", "pydantic_settings", "fastapi")


@dataclass
class Plan:
    """What one run measures: the real models on a GPU, or the tiny ones on the CPU (``dry_run``)."""

    dry_run: bool
    device: str
    repeats: int
    references: int
    explain_tokens: int
    budget_s: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started

    def quantization(self, requested: str) -> tuple[str, str | None]:
        """The quantisation to run for ``requested`` and, when it differs, a note saying why."""
        if self.dry_run and requested in ("4bit", "8bit"):
            return "fp32", f"{requested} NF4 replaced by fp32: dry run on the CPU (same code path, no bitsandbytes)"
        return requested, None


# --- the result file ------------------------------------------------------------------------------------------


class Report:
    """The result JSON, rewritten atomically (temporary file + rename) after every stage."""

    def __init__(self, path: Path, plan: Plan) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "check": "device",
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dry_run": plan.dry_run,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "plan": {k: v for k, v in vars(plan).items() if k != "started"},
            "goals": GOALS,
            "stages": {},
        }
        self.write()

    def write(self) -> None:
        """Write the report: a reader (or a killed run) never sees half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(temporary, self.path)

    def stage(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one stage, record its result (or its error, one line and the traceback's tail) and write the file."""
        print(f"[{time.strftime('%H:%M:%S')}] stage {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = run()
        except Exception as err:  # noqa: BLE001 - a failed stage is recorded; the next stages still run
            result = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}
            result["traceback_tail"] = traceback.format_exc().strip().splitlines()[-8:]
        result["stage_s"] = round(time.perf_counter() - start, 3)
        self.data["stages"][name] = result
        self.write()
        print(f"[{time.strftime('%H:%M:%S')}] stage {name}: {_summary(result)}", flush=True)
        return result

    def skip(self, name: str, why: str) -> None:
        """Record a stage that did not run."""
        self.data["stages"][name] = {"skipped": why}
        self.write()
        print(f"stage {name}: skipped ({why})", flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return repr(value)


def _summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERROR " + result["error"]
    keys = ("peak_vram_gib", "latency_ms_median", "overhead_vs_off_pct", "time_to_first_chunk_s", "tokens_per_s")
    found = {k: v for k, v in result.get("headline", {}).items() if any(k.startswith(p) for p in keys)}
    return json.dumps(found or result.get("headline", {}), default=_jsonable)[:600]


# --- measuring ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak_memory(device: torch.device, into: list[float]) -> Iterator[None]:
    """Append the peak allocated GiB of the block (CUDA: ``max_memory_allocated`` after a reset; else nothing)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into.append(torch.cuda.max_memory_allocated(device) / 2**30)


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000.0, 3)


def _torch_device(plan: Plan) -> torch.device:
    if plan.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(plan.device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(plan: Plan) -> dict[str, Any]:
    """Host, GPU, driver and the library versions the numbers depend on."""
    info: dict[str, Any] = bench_machine.machine_info(PACKAGES)
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = properties.name
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 2)
        info["gpu_capability"] = f"{properties.major}.{properties.minor}"
    info["driver"] = _nvidia_smi("driver_version")
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    with contextlib.suppress(ImportError):
        from expert.search import faiss_gpu_available

        info["faiss_gpu"] = faiss_gpu_available()
    info["headline"] = {"gpu": info.get("gpu", "none (CPU)"), "driver": info["driver"]}
    return info


def _nvidia_smi(field_name: str) -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


# --- the MLLM ---------------------------------------------------------------------------------------------------


@dataclass
class _InspectorSettings:
    """What :class:`mllm.inspector.MLLMInspector` reads (``InspectorSettings``), without the application's root."""

    mllm: MLLMSettings
    caas: CAASSettings


def eagle_images(size: int = 700, seed: int = 0) -> dict[str, Image.Image]:
    """Template, query and boxed query: a synthetic part, the same part with a defect, and that with a red box."""
    from tests.synthetic import add_defect, make_good_image

    rng = np.random.default_rng(seed)
    template = make_good_image(size, size, rng)
    query, mask = add_defect(make_good_image(size, size, rng), "scratch", rng)
    ys, xs = np.nonzero(mask)
    boxed = Image.fromarray(query)
    if len(xs):
        ImageDraw.Draw(boxed).rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], outline="red")
    return {"query": Image.fromarray(query), "template": Image.fromarray(template), "boxed": boxed}


@dataclass
class LoadedForCheck:
    """A loaded model, its inspector and how it was made."""

    inspector: Any
    device: torch.device
    facts: dict[str, Any]


def load_for_check(plan: Plan, preset: str, requested: str, workdir: Path) -> LoadedForCheck:
    """Load ``preset`` (or the tiny model on a dry run) in ``requested`` quantisation through the product's loader."""
    from mllm.inspector import MLLMInspector
    from mllm.loading import load_mllm_from_config, published_config
    from tests.tiny_models import QWEN2_5_REGULAR_VOCAB, TINY_QWEN_MAX_PIXELS, make_qwen2_5_vl_processor

    quantization, note = plan.quantization(requested)
    if plan.dry_run:
        from transformers import AutoConfig

        from tests.tiny_models import make_tiny_qwen2_5_vl

        directory = workdir / "tiny-qwen2.5-vl"
        if not (directory / "config.json").is_file():
            make_tiny_qwen2_5_vl(directory)
        config = AutoConfig.from_pretrained(directory)
        processor = make_qwen2_5_vl_processor()
        settings = MLLMSettings(preset=preset, quantization=quantization, device=plan.device)
        settings.max_pixels = TINY_QWEN_MAX_PIXELS
        model_note = "tiny Qwen2.5-VL (tests/tiny_models.py: 16 layers x 64), random weights"
    else:
        config = published_config(preset)
        processor = make_qwen2_5_vl_processor(regular_vocab=QWEN2_5_REGULAR_VOCAB)
        settings = MLLMSettings(preset=preset, quantization=quantization, device=plan.device)
        model_note = f"{preset}: published configuration (mllm/configs), random weights"
    settings.explanation_max_new_tokens = plan.explain_tokens
    device = _torch_device(plan)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    loaded = load_mllm_from_config(config, processor, settings, caas=CAASSettings())
    _sync(loaded.device)
    facts: dict[str, Any] = {
        "model": model_note,
        "model_id": loaded.model_id,
        "requested_quantization": requested,
        "quantization": loaded.quantization,
        "substitution": note,
        "device": str(loaded.device),
        "load_s": round(time.perf_counter() - start, 3),
        "parameters_billion": round(sum(p.numel() for p in loaded.model.parameters()) / 1e9, 3),
        "decoder_layers": len(loaded.decoder_layers),
        "max_pixels": loaded.max_pixels,
        "vocab_size": int(loaded.model.config.text_config.vocab_size),
        "tokenizer_size": len(loaded.tokenizer),
        "quantized_linear_layers": sum(
            "4bit" in type(m).__name__ or "8bit" in type(m).__name__ for m in loaded.model.modules()
        ),  # fmt: skip
    }
    if loaded.device.type == "cuda":
        facts["weights_gib"] = round(torch.cuda.memory_allocated(loaded.device) / 2**30, 3)
        facts["load_peak_gib"] = round(torch.cuda.max_memory_allocated(loaded.device) / 2**30, 3)
    inspector = MLLMInspector(loaded, _InspectorSettings(mllm=settings, caas=CAASSettings()))
    return LoadedForCheck(inspector=inspector, device=loaded.device, facts=facts)


def caas_configs() -> dict[str, CAASConfig | None]:
    """CAAS off and the three production modes at the default layers and alpha."""
    return {mode: None if mode == "off" else CAASConfig(mode=mode) for mode in CAAS_MODES}


def query_latency(plan: Plan, held: LoadedForCheck, *, goals: bool) -> dict[str, Any]:
    """One full EAGLE query per call, each CAAS mode, interleaved rounds after a warm-up: latency and peak VRAM."""
    images = eagle_images()
    configs = caas_configs()
    device = held.device
    ask = held.inspector.ask
    walls: dict[str, list[float]] = {mode: [] for mode in configs}
    peaks: dict[str, list[float]] = {mode: [] for mode in configs}
    generate_ms: dict[str, list[float]] = {mode: [] for mode in configs}
    last: dict[str, Any] = {}
    for caas in configs.values():  # warm-up: kernels, allocator, CAAS hooks
        ask(**images, expert_anomalous=True, setting="full", caas=caas)
    for _ in range(plan.repeats):
        for mode, caas in configs.items():
            with _peak_memory(device, peaks[mode]):
                _sync(device)
                start = time.perf_counter()
                answer = ask(**images, expert_anomalous=True, setting="full", caas=caas)
                _sync(device)
                walls[mode].append(time.perf_counter() - start)
            generate_ms[mode].append(answer.timings_ms["generate"])
            last[mode] = answer
    base = statistics.median(walls["off"])
    modes: dict[str, Any] = {}
    for mode in configs:
        answer = last[mode]
        modes[mode] = {
            "latency_ms_median": _median_ms(walls[mode]),
            "latency_ms_min": round(min(walls[mode]) * 1000.0, 3),
            "latency_ms_all": [round(v * 1000.0, 3) for v in walls[mode]],
            "generate_ms_median": round(statistics.median(generate_ms[mode]), 3),
            "overhead_vs_off_pct": round(100.0 * (statistics.median(walls[mode]) / base - 1.0), 2),
            "peak_vram_gib": round(max(peaks[mode]), 3) if peaks[mode] else None,
            "caas_applied": answer.caas_applied,
            "n_input_tokens": answer.n_input_tokens,
            "n_new_tokens": answer.n_new_tokens,
            "image_tokens": answer.image_tokens,
        }
    headline: dict[str, Any] = {f"latency_ms_median_{m}": modes[m]["latency_ms_median"] for m in configs}
    headline.update({f"overhead_vs_off_pct_{m}": modes[m]["overhead_vs_off_pct"] for m in configs if m != "off"})
    peak = max((v["peak_vram_gib"] for v in modes.values() if v["peak_vram_gib"] is not None), default=None)
    headline["peak_vram_gib"] = peak
    result: dict[str, Any] = {
        **held.facts,
        "query": "template + query + boxed query, setting 'full', expert says anomalous, greedy, 8 new tokens",
        "repeats": plan.repeats,
        "modes": modes,
        "headline": headline,
    }
    if goals:
        result["goals_met"] = {
            "peak_vram": None if peak is None else peak <= GOALS["mllm_peak_vram_gib_max"],
            "caas_overhead": all(
                modes[m]["overhead_vs_off_pct"] <= GOALS["caas_overhead_pct_max"] for m in configs if m != "off"
            ),
        }
    return result


def explanation_stream(plan: Plan, held: LoadedForCheck) -> dict[str, Any]:
    """Time to the first streamed chunk and tokens per second of the explanation turn (after one warm-up)."""
    images = eagle_images()
    inspector = held.inspector
    answer = inspector.ask(**images, expert_anomalous=True, setting="full")
    runs = []
    for _ in range(2):  # the first is the warm-up
        stats: dict[str, int] = {}
        chunks = 0
        first: float | None = None
        _sync(held.device)
        start = time.perf_counter()
        for _chunk in inspector.explain_stream(**images, expert_anomalous=True, answer=answer, setting="full",
                                              stats=stats):  # fmt: skip
            chunks += 1
            if first is None:
                first = time.perf_counter() - start
        _sync(held.device)
        total = time.perf_counter() - start
        tokens = stats.get("n_new_tokens", 0)
        streaming = total - (first or total)
        runs.append(
            {
                "time_to_first_chunk_s": round(first or total, 4),
                "total_s": round(total, 4),
                "n_input_tokens": stats.get("n_input_tokens"),
                "n_new_tokens": tokens,
                "chunks": chunks,
                # One chunk (no word break in the text): nothing streamed after the first chunk to time.
                "tokens_per_s": round((tokens - 1) / streaming, 2) if chunks > 1 and streaming > 0 else None,
                "tokens_per_s_overall": round(tokens / total, 2) if total > 0 else None,
            }
        )
    measured = runs[-1]
    return {
        "model": held.facts["model"],
        "quantization": held.facts["quantization"],
        "substitution": held.facts["substitution"],
        "max_new_tokens": plan.explain_tokens,
        "definition": "time_to_first_chunk_s: call -> first streamed text (prompt, prefill, first tokens); "
        "tokens_per_s: tokens after the first chunk / time after it",
        "warm_up": runs[0],
        **measured,
        "headline": {k: measured[k] for k in ("time_to_first_chunk_s", "tokens_per_s", "n_new_tokens")},
    }


# --- the expert -------------------------------------------------------------------------------------------------


class _StageClock:
    """A ``progress(stage, fraction)`` callback that records when each build stage starts and ends."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, stage: str, fraction: float, /) -> None:
        now = time.perf_counter()
        self.first.setdefault(stage, now)
        self.last[stage] = now

    def seconds(self, end: float) -> dict[str, float]:
        order = sorted(self.first, key=self.first.__getitem__)
        ends = [self.first[s] for s in order[1:]] + [end]
        return {stage: round(stop - self.first[stage], 3) for stage, stop in zip(order, ends, strict=True)}


def _score_timings(scorer: Any, image: np.ndarray, repeats: int) -> dict[str, Any]:
    scorer.score(image)  # warm-up
    scorer.score(image)
    walls, stages = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = scorer.score(image)
        walls.append(time.perf_counter() - start)
        stages.append(result.timings_ms)
    return {
        "inspection_ms_median": _median_ms(walls),
        "inspection_ms_min": round(min(walls) * 1000.0, 3),
        "stages_ms_median": {k: round(statistics.median(s[k] for s in stages), 3) for k in stages[0]},
        "score": round(float(result.score), 4),
        "tau": round(float(result.tau), 4),
    }


def expert_check(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Build a bank from ``plan.references`` synthetic references and inspect one image, on the GPU where possible."""
    import onnxruntime

    from expert.backbone import build_patch_embedder
    from expert.build import build_bank, fit_bank
    from expert.config import ExpertSettings
    from expert.embedder import TorchEmbedder
    from expert.scorer import ExpertScorer, load_expert
    from expert.search import faiss_gpu_available
    from expert.weights import load_backbone
    from tests.synthetic import add_defect, make_good_image

    device = _torch_device(plan)
    settings = ExpertSettings(weights="random")
    rng = np.random.default_rng(0)
    references = [make_good_image(256, 256, rng) for _ in range(plan.references)]
    names = [f"ref_{i:03d}.png" for i in range(plan.references)]
    query, _ = add_defect(make_good_image(256, 256, rng), "hole", rng)
    backbone, info = load_backbone(settings)
    embedder = TorchEmbedder(build_patch_embedder(backbone, input_size=settings.crop), device=device)
    embedder(np.zeros((1, 3, settings.crop, settings.crop), np.float32))  # CUDA context and kernels, not timed
    notes = []
    clock = _StageClock()
    _sync(device)
    start = time.perf_counter()
    bank = fit_bank(references, names, settings=settings, backbone=backbone, weights_info=info, name="device-check",
                    progress=clock, embedder=embedder)  # fmt: skip
    _sync(device)
    build_s = time.perf_counter() - start
    scorer = ExpertScorer(bank, embedder, settings)
    if not scorer.index.on_gpu:
        why = "no GPU support in this faiss build" if not faiss_gpu_available() else "the index stayed on the CPU"
        notes.append(f"GPU faiss not measured ({why}): the patch search ran on the CPU")
    result: dict[str, Any] = {
        "references": plan.references,
        "memory_bank": list(bank.memory_bank.shape),
        "torch": {
            "embedder_device": str(device),
            "faiss_on_gpu": scorer.index.on_gpu,
            "build_s": round(build_s, 3),
            "build_stages_s": clock.seconds(start + build_s),
            **_score_timings(scorer, query, plan.repeats),
        },
    }
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in providers or plan.dry_run:
        if "CUDAExecutionProvider" not in providers:
            notes.append("dry run: the ONNX build ran on onnxruntime's CPU provider")
        clock = _StageClock()
        start = time.perf_counter()
        build_bank(references, names, settings=settings, backbone=backbone, weights_info=info,
                   out_dir=workdir / "bank", name="device-check", progress=clock,
                   onnx_cache=workdir / "onnx-cache")  # fmt: skip
        onnx_build_s = time.perf_counter() - start
        onnx_scorer = load_expert(workdir / "bank", settings)
        result["onnx"] = {
            "providers": list(onnx_scorer.embedder.providers),
            "build_s_with_export": round(onnx_build_s, 3),
            "build_stages_s": clock.seconds(start + onnx_build_s),
            **_score_timings(onnx_scorer, query, plan.repeats),
        }
    else:
        notes.append(
            f"onnxruntime has no CUDA provider here ({', '.join(providers)}): the product's ONNX path on the GPU "
            "was skipped (it needs onnxruntime-gpu, requirements-gpu.txt)"
        )
    result["notes"] = notes
    torch_part = result["torch"]
    result["headline"] = {
        "build_s": torch_part["build_s"],
        "inspection_ms_median": torch_part["inspection_ms_median"],
        "embedder_device": torch_part["embedder_device"],
    }
    result["goals_met"] = {
        "inspection": torch_part["inspection_ms_median"] <= GOALS["expert_inspection_ms_max"],
        "build": torch_part["build_s"] <= GOALS["expert_build_s_max"],
    }
    del embedder, scorer, backbone
    _free(device)
    return result


# --- the run ----------------------------------------------------------------------------------------------------


def default_out(dry_run: bool) -> Path:
    """``bench/results/device-<date>[-dry-run].json``."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return REPO / "bench" / "results" / f"device-{date}{'-dry-run' if dry_run else ''}.json"


def run(plan: Plan, out: Path) -> dict[str, Any]:
    """Run every stage in order (the optional ones while the budget allows) and return the report's data."""
    report = Report(out, plan)
    report.stage("environment", lambda: environment(plan))
    with tempfile.TemporaryDirectory(prefix="eagle-device-check-") as scratch:
        workdir = Path(scratch)
        held: list[LoadedForCheck] = []

        def load_7b() -> dict[str, Any]:
            held.append(load_for_check(plan, "qwen2.5-vl-7b", "4bit", workdir))
            return query_latency(plan, held[0], goals=True)

        report.stage("mllm_7b_4bit", load_7b)
        if held:
            report.stage("explanation_7b_4bit", lambda: explanation_stream(plan, held[0]))
        else:
            report.skip("explanation_7b_4bit", "the 7B model did not load")
        held.clear()
        _free(_torch_device(plan))
        report.stage("expert", lambda: expert_check(plan, workdir))
        for name, preset, quantization in (
            ("mllm_3b_4bit", "qwen2.5-vl-3b", "4bit"),
            ("mllm_7b_bf16", "qwen2.5-vl-7b", "bf16"),
        ):
            left = plan.budget_s - plan.elapsed()
            if left < 60.0:
                report.skip(name, f"time budget: {left:.0f} s of --budget-s {plan.budget_s:.0f} left")
                continue
            report.stage(name, lambda p=preset, q=quantization: _optional_model(plan, p, q, workdir))
            _free(_torch_device(plan))
    report.data["total_s"] = round(plan.elapsed(), 3)
    report.data["forbidden_modules_imported"] = sorted(
        name for name in sys.modules if name.split(".")[0] in FORBIDDEN_MODULES
    )
    report.write()
    return report.data


def _optional_model(plan: Plan, preset: str, quantization: str, workdir: Path) -> dict[str, Any]:
    held = load_for_check(plan, preset, quantization, workdir)
    try:
        return query_latency(plan, held, goals=False)
    finally:
        del held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, fp32 for NF4, < 1 min")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/device-<date>[-dry-run].json)")
    parser.add_argument("--repeats", type=int, help="timed rounds after the warm-up (default 10; dry run 2)")
    parser.add_argument("--references", type=int, help="references of the expert's bank (default 200; dry run 4)")
    parser.add_argument("--explain-tokens", type=int, help="explanation tokens (default 160; dry run 8)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="soft time budget: the optional stages start only with 60 s of it left")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cpu" if args.dry_run else args.device
    if not args.dry_run and device == "auto" and not torch.cuda.is_available():
        print("no CUDA GPU on this host: run with --dry-run for the CPU proof of the script", file=sys.stderr)
        return 2
    plan = Plan(
        dry_run=args.dry_run,
        device=device,
        repeats=args.repeats or (2 if args.dry_run else 10),
        references=args.references or (4 if args.dry_run else 200),
        explain_tokens=args.explain_tokens or (8 if args.dry_run else 160),
        budget_s=args.budget_s,
    )
    out = args.out or default_out(args.dry_run)
    data = run(plan, out)
    failed = [name for name, stage in data["stages"].items() if "error" in stage]
    print(f"wrote {out} ({data['total_s']:.1f} s){'; FAILED stages: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
