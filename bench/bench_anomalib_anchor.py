"""The speed anchor for bench/bench_precision.py: anomalib's own PatchCore through its OpenVINO inferencer.

Not a test, and run only inside the separate anchor venv (anomalib, OpenVINO and NNCF are never dependencies of
EAGLE; bench/README.md, precision, has the install command). bench/bench_precision.py calls it as a subprocess::

    /work/anchor-venv/bin/python bench/bench_anomalib_anchor.py --data DIR --weights FILE --bank-size N \\
        --repeats 20 --kinds fp32,int8

What it does, on the benchmark's own synthetic set (``DIR/synthetic``: train/good references, test images):

* builds ``anomalib.models.Patchcore(backbone="wide_resnet50_2", layers=["layer2", "layer3"],
  pre_trained=False)`` and loads EAGLE's backbone weights into its timm feature extractor (``FILE``: the state
  dict of :func:`expert.weights.load_backbone`'s module, saved by the parent as safetensors; the loading is
  strict, so the two networks are provably the same);
* fills the memory bank from the references (the model's training forward) and subsamples it with anomalib's
  own k-center-greedy coreset to ``N`` rows, EAGLE's bank size;
* exports with ``Patchcore.to_openvino`` (``fp32``: anomalib's default FP32 IR; ``int8``: the same IR quantised
  with NNCF ``nncf.quantize`` on the references, which is what anomalib's ``CompressionType.INT8_PTQ`` runs —
  that path insists on a datamodule with ≥ 300 validation images, which a 50-reference bank does not have);
* times ``anomalib.deploy.OpenVINOInferencer.predict`` on the test images (uint8 HWC arrays, as EAGLE gets them):
  median of ``--repeats`` after 3 warm-up runs on the first (reference-sized) test image, and reports its image
  AUROC. The IR is exported with a static ``[1, 3, H, W]`` input (the references' size): anomalib's default
  symbolic batch cannot be reshaped to 1 without breaking its upsampling on CPU, so test images of another size
  are resized to H x W first (outside the timing).

It prints one JSON line: ``{"anchor": "anomalib <version> OpenVINOInferencer", "kinds": {kind: {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_precision import median_ms  # noqa: E402  (stdlib-only at import: safe in the anchor venv)


def read_set(base: Path):
    """(references, [(is_defect, image)]) of one category folder, as uint8 RGB arrays."""
    import numpy as np
    from PIL import Image

    def read(path: Path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    refs = [read(p) for p in sorted((base / "train" / "good").glob("*.png"))]
    tests = [
        (folder.name != "good", read(path))
        for folder in sorted((base / "test").iterdir())
        for path in sorted(folder.glob("*.png"))
    ]
    return refs, tests


def fit(image, shape):
    """``image`` at the references' size: the static-shape IR takes nothing else (EAGLE resizes internally)."""
    import cv2

    if image.shape[:2] == shape[:2]:
        return image.copy()
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def build_model(weights: Path, refs, bank_size: int):
    """anomalib's PatchCore with EAGLE's weights and a coreset of ``bank_size`` rows: (model, seconds)."""
    import numpy as np
    import torch
    from anomalib.models import Patchcore

    began = time.perf_counter()
    model = Patchcore(backbone="wide_resnet50_2", layers=["layer2", "layer3"], pre_trained=False)
    extractor = model.model.feature_extractor.feature_extractor
    from safetensors.torch import load_file

    extractor.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    pre = model.pre_processor
    torch_model = model.model
    torch_model.train()  # the training forward stores embeddings
    torch_model.feature_extractor.eval()
    with torch.no_grad():
        for image in refs:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
            tensor = pre.transform(tensor) if pre is not None and pre.transform is not None else tensor
            torch_model(tensor)
    ratio = min(1.0, bank_size / sum(len(e) for e in torch_model.embedding_store))
    torch_model.subsample_embedding(ratio)
    torch_model.eval()
    model.eval()
    return model, time.perf_counter() - began, len(torch_model.memory_bank)


def export(model, kind: str, refs, root: Path) -> Path:
    """The OpenVINO IR of ``model``: anomalib's FP32 export, or that IR quantised with NNCF on ``refs``."""
    import numpy as np
    import openvino as ov

    height, width = refs[0].shape[:2]
    # A static batch of 1 (what the inferencer feeds): anomalib's default export has a symbolic batch that it
    # traces with an example of 2, and reshaping that IR to 1 afterwards breaks its bilinear upsampling on CPU.
    path = model.to_openvino(root / kind, input_size=(height, width), onnx_kwargs={"dynamic_shapes": None})
    if kind == "fp32":
        return path
    core = ov.Core()
    ir = core.read_model(str(path))
    import nncf

    batches = [
        (np.asarray(fit(image, refs[0].shape), np.float32) / 255.0).transpose(2, 0, 1)[None].copy() for image in refs
    ]
    quantised = nncf.quantize(ir, nncf.Dataset(batches), subset_size=len(batches))
    target = root / "int8" / "model_int8.xml"
    ov.save_model(quantised, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--bank-size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kinds", default="fp32,int8")
    args = parser.parse_args()

    import anomalib
    import openvino
    import torch
    from anomalib.deploy import OpenVINOInferencer
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(os.cpu_count() or 1)
    refs, tests = read_set(args.data / "synthetic")
    model, build_s, rows = build_model(args.weights, refs, args.bank_size)
    out: dict = {
        "anchor": f"anomalib {anomalib.__version__} OpenVINOInferencer (openvino {openvino.__version__})",
        "bank_rows": rows,
        "build_s": build_s,
        "kinds": {},
    }
    root = Path(tempfile.mkdtemp(prefix="bench-anchor-"))
    for kind in args.kinds.split(","):
        began = time.perf_counter()
        try:
            path = export(model, kind, refs, root)
        except ImportError as err:
            out["kinds"][kind] = {"skipped": f"{type(err).__name__}: {err}"}
            continue
        export_s = time.perf_counter() - began
        inferencer = OpenVINOInferencer(path=path, device="CPU")
        scores = [float(inferencer.predict(fit(image, refs[0].shape)).pred_score.reshape(-1)[0]) for _, image in tests]
        image = tests[0][1]
        out["kinds"][kind] = {
            "export_s": export_s,
            "score_ms": median_ms(lambda image=image, run=inferencer: run.predict(image.copy()), args.repeats),
            "image_auroc": float(roc_auc_score([d for d, _ in tests], scores)),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
