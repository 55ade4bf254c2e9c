"""Benchmark the expert's precision: fp32 vs int8 — accuracy, speed, batch throughput and memory, in one run.

Not a test. The seeded random-weight WideResNet-50-2 (the tests' backbone: the timings are real, the accuracy is
that of random features) on two data sets:

* ``synthetic``: the synthetic MVTec-like set (tests/synthetic.py), 50 references, 20 good + 30 defective tests;
* ``photo:<name>``: openly licensed photographs shipped by scikit-image (``skimage.data``: the textures brick,
  grass and gravel, and the stained-tissue image immunohistochemistry): references and good tests are random
  256-px crops, defective tests are crops with a painted defect (a stain, a scratch or a pasted foreign patch;
  the painted pixels are the ground-truth mask).

Kinds (``--kinds``, default ``fp32,int8,int8-plain,int8-ov``): ``fp32`` (the exported graph), ``int8`` (EAGLE's
default int8 recipe: onnxruntime ``quantize_static``, QDQ, uint8 activations, int8 per-channel weights, min/max
calibration on the bank's own references, only Conv nodes quantised and the last two kept float32),
``int8-plain`` (onnxruntime's plain recipe: every operator quantised), ``int8-qop`` (plain in QOperator format),
``int8-s8sym`` (plain with int8 symmetric activations) and ``int8-ov`` (OpenVINO with NNCF post-training
quantisation on the same calibration images). Each kind runs in its own subprocess (peak RSS per kind) and:

* builds one bank per data set (calibration + quantisation, then embed → coreset → DBT; the bank is not saved,
  which costs the same for every kind) — the synthetic one from 50 references is the build time reported;
* scores every test image: image AUROC, pixel AUROC, and per image the score, τ, verdict and top box;
* times, after 3 warm-up runs, the median of ``--repeats`` (≥ 20) runs of: the embedding of one image (the
  ``embed`` stage), ``ExpertScorer.score`` end to end, and ``ExpertScorer.score_many`` at batch 1, 2, 4, 8
  (images/s).

The parent then compares every int8 kind with fp32 image by image: the fraction of verdicts that differ, the mean
``|s_fp32/τ_fp32 − s_int8/τ_int8|`` (score difference relative to each bank's τ) on all and on the normal images,
and the mean IoU of the two top boxes. The table is printed and saved, with the machine (bench/machine.py) and the
load average, to ``bench/results/precision-<date>.json``.

scikit-image, OpenVINO and NNCF are NOT dependencies of EAGLE. Install them into a separate bench venv; the bench
appends its site-packages AFTER the project's, so the project's numpy, torch and onnxruntime win::

    .venv/bin/python -m venv /tmp/benchvenv-precision
    /tmp/benchvenv-precision/bin/pip install scikit-image==0.26.0 openvino==2026.4.1 nncf==3.4.0

Usage::

    .venv/bin/python bench/bench_precision.py                       # ~8 min on 2 idle cores (with the anchor)
    .venv/bin/python bench/bench_precision.py --quick               # few images and repeats: a smoke run
    .venv/bin/python bench/bench_precision.py --kinds fp32,int8     # without the alternatives
    .venv/bin/python bench/bench_precision.py --accuracy-only --kinds int8-plain,int8-plain:method=percentile
                                                                    # a recipe search: accuracy only (no timings)

Kinds of the form ``int8:field=value:...`` are the default recipe with :class:`expert.quantize.QuantRecipe` fields
changed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_VENV = Path("/tmp/benchvenv-precision")
ANCHOR_VENV = Path("/work/anchor-venv")
PHOTOS = ("brick", "grass", "gravel", "immunohistochemistry")
CROP = 256
BATCHES = (1, 2, 4, 8)
WARMUP = 3


def add_bench_venv(venv: Path) -> bool:
    """Append the bench venv's site-packages (after the project's): True when it exists."""
    found = sorted(venv.glob("lib/python*/site-packages"))
    for path in found:
        if str(path) not in sys.path:
            sys.path.append(str(path))
    return bool(found)


# ------------------------------------------------------------------------------------------------ data
def make_photo_set(root: Path, name: str, n_refs: int, n_good: int, n_bad: int, seed: int) -> Path:
    """Random crops of one skimage photo: train/good, test/good, test/defect + ground_truth masks."""
    import cv2
    import numpy as np
    import skimage.data
    from PIL import Image

    photo = getattr(skimage.data, name)()
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    foreign = skimage.data.astronaut()
    rng = np.random.default_rng(seed)
    height, width = photo.shape[:2]

    def crop() -> np.ndarray:
        y, x = rng.integers(0, height - CROP + 1), rng.integers(0, width - CROP + 1)
        return np.ascontiguousarray(photo[y : y + CROP, x : x + CROP])

    def paint(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image = image.copy()
        mask = np.zeros(image.shape[:2], np.uint8)
        kind = rng.integers(3)
        cy, cx = (int(v) for v in rng.integers(64, CROP - 64, size=2))
        if kind == 0:  # stain: a coloured ellipse
            axes = (int(rng.integers(10, 28)), int(rng.integers(8, 22)))
            cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
            colour = rng.integers(0, 256, size=3)
            image[mask > 0] = (0.3 * image[mask > 0] + 0.7 * colour).astype(np.uint8)
        elif kind == 1:  # scratch: a thick line, dark or bright
            angle = rng.uniform(0, np.pi)
            length = rng.integers(40, 90)
            dx, dy = int(np.cos(angle) * length / 2), int(np.sin(angle) * length / 2)
            cv2.line(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 255, int(rng.integers(3, 7)))
            image[mask > 0] = 255 if rng.random() < 0.5 else 0
        else:  # foreign material: a patch of another photo
            side = int(rng.integers(24, 48))
            fy, fx = rng.integers(0, foreign.shape[0] - side), rng.integers(0, foreign.shape[1] - side)
            y0, x0 = cy - side // 2, cx - side // 2
            image[y0 : y0 + side, x0 : x0 + side] = foreign[fy : fy + side, fx : fx + side]
            mask[y0 : y0 + side, x0 : x0 + side] = 255
        return image, mask

    base = root / name
    for split, count in (("train/good", n_refs), ("test/good", n_good)):
        for i in range(count):
            (base / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop()).save(base / split / f"{i:03d}.png")
    for i in range(n_bad):
        image, mask = paint(crop())
        for folder, array, file in (
            (base / "test" / "defect", image, f"{i:03d}.png"),
            (base / "ground_truth" / "defect", mask, f"{i:03d}_mask.png"),
        ):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / file)
    return base


def read_category(base: Path) -> dict:
    """{refs: [(name, image)], tests: [(label, name, image, mask or None)]}."""
    import numpy as np
    from PIL import Image

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    refs = [(p.name, read(p)) for p in sorted((base / "train" / "good").glob("*.png"))]
    tests = []
    for folder in sorted((base / "test").iterdir()):
        for path in sorted(folder.glob("*.png")):
            mask = None
            if folder.name != "good":
                with Image.open(base / "ground_truth" / folder.name / f"{path.stem}_mask.png") as m:
                    mask = np.asarray(m.convert("L")) > 127
            tests.append((folder.name, f"{folder.name}/{path.name}", read(path), mask))
    return {"refs": refs, "tests": tests}


# ---------------------------------------------------------------------------------------------- worker
class OpenVinoEmbedder:
    """An NNCF-quantised OpenVINO model as an :class:`expert.embedder.Embedder`."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.output = compiled.output(0)

    def __call__(self, batch):
        import numpy as np

        return np.asarray(self.compiled(np.ascontiguousarray(batch, dtype=np.float32))[self.output])


NAMED_RECIPES = {
    "int8-plain": {},
    "int8-qop": {"format": "qoperator"},
    "int8-s8sym": {"activations": "int8", "symmetric_activations": True},
}
"""Kinds with a name of their own: fields changed from onnxruntime's plain recipe ``QuantRecipe()`` (``int8-plain``:
every operator quantised, uint8 activations, min/max). ``int8`` is EAGLE's :data:`expert.quantize.DEFAULT_RECIPE`."""


def kind_recipe(kind: str):
    """The :class:`expert.quantize.QuantRecipe` of an onnxruntime int8 kind; None for the others.

    ``int8`` (EAGLE's default) or a name of :data:`NAMED_RECIPES`, optionally followed by ``:field=value:...`` —
    that recipe with fields changed (``int8-plain:method=percentile``; values are parsed as JSON, else strings).
    """
    from dataclasses import fields, replace

    from expert.quantize import DEFAULT_RECIPE, QuantRecipe

    name, *parts = kind.split(":")
    if name != "int8" and name not in NAMED_RECIPES:
        return None
    base = DEFAULT_RECIPE if name == "int8" else replace(QuantRecipe(), **NAMED_RECIPES[name])
    known = {f.name for f in fields(DEFAULT_RECIPE)}
    changes: dict = {}
    for part in parts:
        field, _, value = part.partition("=")
        if field not in known:
            raise SystemExit(f"unknown recipe field {field!r} in kind {kind!r} (known: {', '.join(sorted(known))})")
        try:
            changes[field] = json.loads(value)
        except json.JSONDecodeError:
            changes[field] = value
    return replace(base, **changes)


def make_embedder(kind: str, fp32_graph: Path, calibration, scratch: Path):
    """(embedder, quantisation seconds) for ``kind``."""
    from expert.embedder import OnnxEmbedder
    from expert.quantize import quantize_graph

    began = time.perf_counter()
    if kind == "fp32":
        return OnnxEmbedder(fp32_graph), 0.0
    recipe = kind_recipe(kind)
    if recipe is not None:
        target = scratch / f"{kind}-{time.time_ns()}.onnx"
        quantize_graph(fp32_graph, target, calibration, recipe)
        return OnnxEmbedder(target, ["CPUExecutionProvider"]), time.perf_counter() - began
    if kind == "int8-ov":
        import nncf
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(fp32_graph))
        dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
        quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
        compiled = core.compile_model(quantized, "CPU")
        return OpenVinoEmbedder(compiled), time.perf_counter() - began
    raise ValueError(f"unknown kind {kind!r}")


def median_ms(fn, repeats: int) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000.0)
    return statistics.median(times)


def worker(kind: str, data: Path, cache_dir: Path, repeats: int) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from expert.build import fit_bank
    from expert.config import ExpertSettings
    from expert.onnx_cache import ExportKey, OnnxCache
    from expert.preprocess import expert_normalization
    from expert.quantize import MAX_CALIBRATION_IMAGES, calibration_tensors
    from expert.scorer import ExpertScorer
    from expert.weights import WeightsInfo, load_backbone

    torch.set_num_threads(os.cpu_count() or 1)
    settings = ExpertSettings(weights="random", seed=0, precision="fp32" if kind == "fp32" else "int8")
    info = json.loads((cache_dir / "weights.json").read_text())
    weights_info = WeightsInfo(**info)
    key = ExportKey.create(settings.backbone, weights_info.checksum, crop=settings.crop)
    fp32_graph = OnnxCache(cache_dir).get(key, lambda: load_backbone(settings)[0])
    normalization = expert_normalization(settings)
    out: dict = {"kind": kind, "sets": {}}
    scratch = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    speed_scorer = None
    for base in sorted(p for p in data.iterdir() if p.is_dir()):
        category = read_category(base)
        names = [n for n, _ in category["refs"]]
        images = [im for _, im in category["refs"]]
        recipe = kind_recipe(kind)
        calibration = calibration_tensors(
            images,
            resize=settings.resize,
            crop=settings.crop,
            center_crop=True,
            normalization=normalization,
            limit=recipe.max_images if recipe is not None else MAX_CALIBRATION_IMAGES,
            flip_augment=recipe is not None and recipe.flip_augment,
        )
        embedder, quantise_s = make_embedder(kind, fp32_graph, calibration, scratch)
        began = time.perf_counter()
        bank = fit_bank(
            images,
            names,
            settings=settings,
            backbone=None,
            weights_info=weights_info,
            name=base.name,
            embedder=embedder,
        )
        fit_s = time.perf_counter() - began
        scorer = ExpertScorer(bank, embedder, settings)
        rows, labels, scores, pixel_truth, pixel_scores = [], [], [], [], []
        for label, name, image, mask in category["tests"]:
            result = scorer.score(image)
            top = result.boxes[0] if result.boxes else None
            rows.append(
                {
                    "name": name,
                    "defect": label != "good",
                    "score": result.score,
                    "tau": result.tau,
                    "anomalous": result.anomalous,
                    "box": None if top is None else [top.x0, top.y0, top.x1, top.y1],
                }
            )
            labels.append(label != "good")
            scores.append(result.score)
            amap = result.anomaly_map
            valid = result.valid_mask
            truth = mask if mask is not None else np.zeros(amap.shape, bool)
            pixel_truth.append(truth[valid][::4])
            pixel_scores.append(amap[valid][::4])
        out["sets"][base.name] = {
            "references": len(images),
            "calibration_images": len(calibration),
            "quantise_s": quantise_s,
            "fit_s": fit_s,
            "build_s": quantise_s + fit_s,
            "tau": bank.meta.threshold.tau,
            "bank_rows": len(bank.memory_bank),
            "image_auroc": float(roc_auc_score(labels, scores)),
            "pixel_auroc": float(roc_auc_score(np.concatenate(pixel_truth), np.concatenate(pixel_scores))),
            "rows": rows,
        }
        if base.name == "synthetic":
            speed_scorer, speed_images = scorer, [t[2] for t in category["tests"]]
    assert speed_scorer is not None
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if repeats == 0:  # --accuracy-only
        return out
    image = speed_images[0]
    tensor, _ = speed_scorer._preprocess(image)
    embed = speed_scorer.embedder
    out["embed_ms"] = median_ms(lambda: embed(tensor[None]), repeats)
    out["score_ms"] = median_ms(lambda: speed_scorer.score(image), repeats)
    out["images_per_s"] = {}
    for batch in BATCHES:
        chunk = (speed_images * 8)[:batch]
        ms = median_ms(lambda chunk=chunk, batch=batch: speed_scorer.score_many(chunk, batch_size=batch), repeats)
        out["images_per_s"][str(batch)] = batch * 1000.0 / ms
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def worker_warm(cache_dir: Path) -> dict:
    from dataclasses import asdict

    from expert.config import ExpertSettings
    from expert.onnx_cache import ExportKey, OnnxCache
    from expert.weights import load_backbone

    settings = ExpertSettings(weights="random", seed=0)
    module, info = load_backbone(settings)
    key = ExportKey.create(settings.backbone, info.checksum, crop=settings.crop)
    OnnxCache(cache_dir).get(key, module)
    (cache_dir / "weights.json").write_text(json.dumps(asdict(info)))
    return {"ok": True}


# ---------------------------------------------------------------------------------------------- parent
def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def compare(base: dict, other: dict) -> dict:
    """Image-by-image agreement of ``other`` with ``base`` (fp32), per set and over all sets."""
    per_set, all_rows = {}, []
    for name, ref in base["sets"].items():
        mine = other["sets"][name]
        pairs = list(zip(ref["rows"], mine["rows"], strict=True))
        all_rows.extend(pairs)
        per_set[name] = _agreement(pairs) | {
            "image_auroc": (ref["image_auroc"], mine["image_auroc"]),
            "pixel_auroc": (ref["pixel_auroc"], mine["pixel_auroc"]),
        }
    return {"sets": per_set, "all": _agreement(all_rows)}


def _agreement(pairs) -> dict:
    differ = sum(a["anomalous"] != b["anomalous"] for a, b in pairs)
    rel = [abs(a["score"] / a["tau"] - b["score"] / b["tau"]) for a, b in pairs]
    rel_good = [abs(a["score"] / a["tau"] - b["score"] / b["tau"]) for a, b in pairs if not a["defect"]]
    ious = [_iou(a["box"], b["box"]) for a, b in pairs if a["box"] and b["box"]]
    return {
        "images": len(pairs),
        "verdicts_differ": differ / len(pairs),
        "mean_abs_diff_over_tau": statistics.fmean(rel),
        "mean_abs_diff_over_tau_good": statistics.fmean(rel_good) if rel_good else float("nan"),
        "box_iou_vs_fp32": statistics.fmean(ious) if ious else float("nan"),
    }


def table(results: dict[str, dict]) -> str:
    base = results["fp32"]
    lines = [
        "| kind | set | image AUROC | pixel AUROC | verdicts differ | mean abs(Δs)/τ (good) | top-box IoU vs fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, result in results.items():
        comparison = compare(base, result)
        for name, row in comparison["sets"].items():
            lines.append(
                f"| {kind} | {name} | {row['image_auroc'][1]:.3f} | {row['pixel_auroc'][1]:.3f} | "
                f"{100 * row['verdicts_differ']:.1f} % | {row['mean_abs_diff_over_tau']:.3f} "
                f"({row['mean_abs_diff_over_tau_good']:.3f}) | {row['box_iou_vs_fp32']:.2f} |"
            )
        every = comparison["all"]
        lines.append(
            f"| {kind} | **all {every['images']}** | | | **{100 * every['verdicts_differ']:.1f} %** | "
            f"{every['mean_abs_diff_over_tau']:.3f} ({every['mean_abs_diff_over_tau_good']:.3f}) | "
            f"{every['box_iou_vs_fp32']:.2f} |"
        )
    if any("embed_ms" not in r for r in results.values()):  # --accuracy-only
        return "\n".join(lines)
    lines += [
        "",
        "| kind | embed ms (batch 1) | × fp32 | score ms end to end | × fp32 | images/s at batch "
        + ", ".join(map(str, BATCHES))
        + " | build 50 refs s (of it quantise) | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in results.items():
        syn = r["sets"]["synthetic"]
        rates = ", ".join(f"{r['images_per_s'][str(b)]:.2f}" for b in BATCHES)
        lines.append(
            f"| {kind} | {r['embed_ms']:.0f} | {base['embed_ms'] / r['embed_ms']:.2f} | {r['score_ms']:.0f} | "
            f"{base['score_ms'] / r['score_ms']:.2f} | {rates} | {syn['build_s']:.1f} ({syn['quantise_s']:.1f}) | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def run_worker(args: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=REPO, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_anchor(venv: Path, data: Path, fp32: dict, repeats: int, work: Path) -> dict:
    """anomalib's OpenVINO PatchCore (bench/bench_anomalib_anchor.py) in the anchor venv, or why it did not run."""
    python = venv / "bin" / "python"
    if not python.exists():
        return {"anchor": "none", "why": f"no anchor venv at {venv} (bench/README.md, precision)"}

    from safetensors.torch import save_file

    from expert.config import ExpertSettings
    from expert.weights import load_backbone

    weights = work / "backbone-state.safetensors"  # safetensors: nothing is ever unpickled
    state = load_backbone(ExpertSettings(weights="random", seed=0))[0].state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(weights))
    rows = fp32["sets"]["synthetic"]["bank_rows"]
    command = [str(python), str(REPO / "bench" / "bench_anomalib_anchor.py"), "--data", str(data)]
    command += ["--weights", str(weights), "--bank-size", str(rows), "--repeats", str(repeats)]
    # cwd: anomalib's inferencer writes its compiled-model cache to ./openvino_cache
    done = subprocess.run(command, capture_output=True, text=True, cwd=work, check=False)
    if done.returncode != 0:
        return {"anchor": "failed", "why": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def anchor_table(anchor: dict, fp32: dict) -> str:
    """The anchor's rows (end-to-end ms vs EAGLE fp32), or the line saying which anchor ran and why not."""
    if "kinds" not in anchor:
        return f"anchor: {anchor['anchor']} ({anchor['why']})"
    lines = [
        f"anchor: {anchor['anchor']}, bank {anchor['bank_rows']} rows, build {anchor['build_s']:.1f} s",
        "| anchor kind | score ms end to end | EAGLE fp32 ms / anchor ms | image AUROC (synthetic) |",
        "| --- | --- | --- | --- |",
    ]
    for kind, row in anchor["kinds"].items():
        if "skipped" in row:
            lines.append(f"| anomalib-ov-{kind} | skipped: {row['skipped']} | | |")
            continue
        lines.append(
            f"| anomalib-ov-{kind} | {row['score_ms']:.0f} | {fp32['score_ms'] / row['score_ms']:.2f} | "
            f"{row['image_auroc']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="fp32,int8,int8-plain,int8-ov")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="few images and 5 repeats (a smoke run)")
    parser.add_argument(
        "--accuracy-only", action="store_true", help="the accuracy table only: no timings, no anchor (recipe search)"
    )
    parser.add_argument("--bench-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--anchor-venv", type=Path, default=ANCHOR_VENV, help="venv with anomalib, openvino, nncf")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    add_bench_venv(args.bench_venv)
    if args.worker == "warm":
        print(json.dumps(worker_warm(args.cache)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.cache, args.repeats)))
        return

    from bench.machine import machine_info
    from tests.synthetic import make_mvtec_like

    kinds = args.kinds.split(",")
    if "fp32" not in kinds:
        kinds.insert(0, "fp32")
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        if "int8-ov" in kinds:
            print("OpenVINO/NNCF not installed in the bench venv: skipping int8-ov", file=sys.stderr)
            kinds.remove("int8-ov")
    repeats = 0 if args.accuracy_only else 5 if args.quick else max(20, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    data, cache = work / "data", work / "cache"
    cache.mkdir(parents=True)
    n_train, n_good, n_bad = (20, 6, 3) if args.quick else (50, 20, 10)
    synthetic = make_mvtec_like(
        work / "syn", category="synthetic", n_train=n_train, n_test_good=n_good, n_test_bad_per_type=n_bad
    )
    data.mkdir()
    (synthetic / "synthetic").rename(data / "synthetic")
    for i, photo in enumerate(PHOTOS):
        make_photo_set(data, photo, 20, 5 if args.quick else 10, 5 if args.quick else 10, seed=i)
    load_before = os.getloadavg()
    run_worker(["--worker", "warm", "--cache", str(cache)])
    results = {}
    for kind in kinds:
        print(f"running {kind} ...", file=sys.stderr, flush=True)
        results[kind] = run_worker(
            [
                "--worker",
                kind,
                "--data",
                str(data),
                "--cache",
                str(cache),
                "--repeats",
                str(repeats),
                "--bench-venv",
                str(args.bench_venv),
            ]
        )
    if args.accuracy_only:
        anchor: dict = {"skipped": "--accuracy-only"}
        text = table(results)
    else:
        anchor = run_anchor(args.anchor_venv, data, results["fp32"], repeats, work)
        text = table(results) + "\n\n" + anchor_table(anchor, results["fp32"])
    print(text)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(
            ["torch", "onnxruntime", "onnx", "numpy", "faiss-cpu", "scikit-image", "openvino", "nncf"]
        ),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "repeats": repeats,
        "quick": args.quick,
        "weights": "random (seed 0): real speed, accuracy of random features",
        "results": results,
        "comparisons": {k: compare(results["fp32"], r) for k, r in results.items() if k != "fp32"},
        "anchor": anchor,
        "table": text,
    }
    stem = "precision-accuracy" if args.accuracy_only else "precision"
    out = REPO / "bench" / "results" / f"{stem}-{datetime.now(timezone.utc):%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
