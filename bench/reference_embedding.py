"""Recompute the expert's embedding and scores the reference code's way, independently, and compare with ours.

The reference code (PatchCore as EAGLE's repository ships it) embeds an image like this: torchvision
``Resize(256)`` + ``CenterCrop(224)`` + ``ToTensor`` + ImageNet ``Normalize``; forward hooks on the backbone's
``layer2`` and ``layer3``; each map cut into 3×3 patches (``torch.nn.Unfold``, stride 1, zero padding 1), giving
a ``C × 3 × 3`` block per position; layer3's blocks resized element by element (bilinear, ``align_corners=False``)
from its 14×14 grid to layer2's 28×28; each layer's flattened block averaged down to 1024 values
(``F.adaptive_avg_pool1d``, the ``MeanMapper``), the two stacked and averaged down again to 1024 (the
``Aggregator``). A patch's score is its squared L2 distance to the nearest memory-bank feature (faiss
``IndexFlatL2``), the image score the largest patch score.

This script writes that data flow again in NumPy float64 — its own unfolding, bilinear resize and adaptive
average pooling, written from the description above, not from the product's code — on feature maps taken with
forward hooks from a full timm WideResNet-50-2 that holds the product's backbone weights, and compares with the
product: :func:`expert.preprocess.preprocess`, :func:`expert.backbone.build_patch_embedder` (the folded
convolutions the product runs) and :class:`expert.search.PatchIndex` (faiss). The memory bank is every patch of
the reference images (no coreset, so both sides search the same set).

Usage::

    .venv/bin/python bench/reference_embedding.py                     # random weights, 3 references, 2 queries
    .venv/bin/python bench/reference_embedding.py --weights hub       # the ImageNet weights (needs the cache/hub)

It prints the relative errors and writes ``bench/results/reference-embedding-<date>.json``; exit status 1 when
an error exceeds its tolerance (:data:`TOLERANCES`; ``--scale`` multiplies them all).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBED_DIM = 1024
TOLERANCES = {
    "embedding_relative_error": 1e-6,
    "image_scores_relative_error": 1e-5,
    # faiss computes squared distances as |q|² - 2 q·b + |b|² in float32: near-zero patch scores lose digits to
    # cancellation (the reference code searches with the same faiss index, so it shares that rounding).
    "patch_scores_relative_error": 1e-4,
}
"""Largest relative error accepted per quantity (ours vs the float64 recomputation)."""


# --- the reference's data flow, in NumPy ------------------------------------------------------------------------


def adaptive_avg_pool_1d(rows: np.ndarray, size: int) -> np.ndarray:
    """Average each row of ``rows`` ``[N, L]`` down to ``size`` values, bin ``i`` = ``[floor(iL/s), ceil((i+1)L/s))``.

    Example:
        >>> adaptive_avg_pool_1d(np.array([[1.0, 2.0, 3.0, 4.0, 5.0]]), 2).tolist()
        [[2.0, 4.0]]
    """
    length = rows.shape[1]
    out = np.empty((rows.shape[0], size), dtype=np.float64)
    for index in range(size):
        start = (index * length) // size
        end = -((-(index + 1) * length) // size)  # ceil
        out[:, index] = rows[:, start:end].mean(axis=1)
    return out


def bilinear_resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``maps`` ``[K, h, w]`` to ``[K, height, width]``: half-pixel centres, edges clamped.

    Output pixel ``y`` samples the input at ``(y + 0.5) · h / height - 0.5`` (negative positions clamped to 0).

    Example:
        >>> bilinear_resize(np.array([[[0.0, 4.0]]]), 1, 4).round(6).tolist()
        [[[0.0, 1.0, 3.0, 4.0]]]
    """

    def taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
        low = np.minimum(np.floor(position).astype(int), in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, position - low

    y0, y1, fy = taps(height, maps.shape[1])
    x0, x1, fx = taps(width, maps.shape[2])
    top = maps[:, y0][:, :, x0] * (1 - fx) + maps[:, y0][:, :, x1] * fx
    bottom = maps[:, y1][:, :, x0] * (1 - fx) + maps[:, y1][:, :, x1] * fx
    return top * (1 - fy)[None, :, None] + bottom * fy[None, :, None]


def patch_blocks(feature_map: np.ndarray) -> np.ndarray:
    """``[C, h, w]`` → ``[C, 3, 3, h, w]``: the zero-padded 3×3 block around every position (Unfold's layout)."""
    channels, height, width = feature_map.shape
    padded = np.zeros((channels, height + 2, width + 2), dtype=np.float64)
    padded[:, 1:-1, 1:-1] = feature_map
    blocks = np.empty((channels, 3, 3, height, width), dtype=np.float64)
    for ky in range(3):
        for kx in range(3):
            blocks[:, ky, kx] = padded[:, ky : ky + height, kx : kx + width]
    return blocks


def reference_embedding(layer2: np.ndarray, layer3: np.ndarray, embed_dim: int = EMBED_DIM) -> np.ndarray:
    """One image's patch features ``[h·w, embed_dim]`` from its ``layer2`` ``[C2, h, w]`` and ``layer3`` maps."""
    height, width = layer2.shape[1:]
    blocks2 = patch_blocks(layer2)
    blocks3 = patch_blocks(layer3)
    c3 = blocks3.shape[0]
    blocks3 = bilinear_resize(blocks3.reshape(c3 * 9, *blocks3.shape[3:]), height, width).reshape(
        c3, 3, 3, height, width
    )
    per_layer = []
    for blocks in (blocks2, blocks3):
        rows = blocks.reshape(-1, height * width).T  # one row per position, ordered (c, ky, kx)
        per_layer.append(adaptive_avg_pool_1d(rows, embed_dim))
    stacked = np.stack(per_layer, axis=1).reshape(height * width, 2 * embed_dim)
    return adaptive_avg_pool_1d(stacked, embed_dim)


def reference_scores(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each query row to its nearest bank row (brute force, float64)."""
    squared = (queries**2).sum(1)[:, None] - 2.0 * queries @ bank.T + (bank**2).sum(1)[None, :]
    return np.maximum(squared.min(axis=1), 0.0)


# --- inputs and the two sides -----------------------------------------------------------------------------------


def synthetic_images(count: int, seed: int, size: tuple[int, int] = (240, 300)) -> list[np.ndarray]:
    """``count`` textured RGB uint8 images (a smooth pattern + noise); the last one gets a dark scratch."""
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for index in range(count):
        base = 120 + 40 * np.sin(xx / 9.0 + index) + 30 * np.cos(yy / 13.0)
        image = np.clip(base[..., None] + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        if index == count - 1:
            image[height // 2 - 3 : height // 2 + 3, width // 4 : 3 * width // 4] = 20
        images.append(image)
    return images


def reference_input(image: np.ndarray) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize on the PIL image, as the reference."""
    from PIL import Image
    from torchvision import transforms

    pipeline = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return pipeline(Image.fromarray(image)).numpy()


def hooked_layers(backbone_state: dict, name: str):
    """A full timm model holding ``backbone_state``, and a function returning its layer2/layer3 maps for a batch."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False)
    missing, unexpected = model.load_state_dict(backbone_state, strict=False)
    if unexpected or any(not key.startswith(("fc.", "layer4.")) for key in missing):
        raise RuntimeError(
            f"the backbone's weights do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.eval()
    seen: dict[str, torch.Tensor] = {}
    model.layer2.register_forward_hook(lambda _m, _i, out: seen.__setitem__("layer2", out))
    model.layer3.register_forward_hook(lambda _m, _i, out: seen.__setitem__("layer3", out))

    def layers(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            model(torch.from_numpy(batch))
        return seen["layer2"].double().numpy(), seen["layer3"].double().numpy()

    return layers


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """``‖ours − theirs‖ / ‖theirs‖`` (Frobenius)."""
    return float(np.linalg.norm(np.asarray(ours, np.float64) - theirs) / max(np.linalg.norm(theirs), 1e-30))


def compare(references: int, queries: int, *, weights: str = "random", seed: int = 0) -> dict:
    """Embed ``references`` + ``queries`` synthetic images both ways; the errors of input, features and scores."""
    import torch

    from expert.backbone import build_patch_embedder
    from expert.config import ExpertSettings
    from expert.preprocess import preprocess
    from expert.search import PatchIndex
    from expert.weights import load_backbone

    settings = ExpertSettings(weights=weights)
    backbone, info = load_backbone(settings)
    embedder = build_patch_embedder(backbone).eval()
    layers = hooked_layers(backbone.state_dict(), settings.backbone)
    images = synthetic_images(references + queries, seed)

    ours_inputs = np.stack([preprocess(image)[0] for image in images])
    their_inputs = np.stack([reference_input(image) for image in images])
    with torch.no_grad():
        ours = embedder(torch.from_numpy(ours_inputs)).numpy()
    layer2, layer3 = layers(their_inputs.astype(np.float32))
    theirs = np.stack([reference_embedding(layer2[i], layer3[i]) for i in range(len(images))])

    bank_theirs = theirs[:references].reshape(-1, theirs.shape[-1])
    bank_ours = ours[:references].reshape(-1, ours.shape[-1])
    index = PatchIndex(np.ascontiguousarray(bank_ours, dtype=np.float32))
    scores_theirs = np.stack([reference_scores(bank_theirs, theirs[references + q]) for q in range(queries)])
    scores_ours = np.stack([index.search(ours[references + q]) for q in range(queries)])
    return {
        "backbone": settings.backbone,
        "weights": info.source,
        "references": references,
        "queries": queries,
        "features_shape": list(ours.shape),
        "input_max_abs_diff": float(np.abs(ours_inputs - their_inputs).max()),
        "embedding_relative_error": relative_error(ours, theirs),
        "embedding_max_abs_diff": float(np.abs(ours - theirs).max()),
        "patch_scores_relative_error": relative_error(scores_ours, scores_theirs),
        "image_scores_ours": [float(s) for s in scores_ours.max(axis=1)],
        "image_scores_reference": [float(s) for s in scores_theirs.max(axis=1)],
        "image_scores_relative_error": relative_error(scores_ours.max(axis=1), scores_theirs.max(axis=1)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=3, help="reference images in the memory bank")
    parser.add_argument("--queries", type=int, default=2, help="query images scored against it")
    parser.add_argument("--weights", choices=("random", "hub"), default="random", help="backbone weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every tolerance by this factor")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/reference-embedding-<date>.json)")
    args = parser.parse_args(argv)
    if args.references < 1 or args.queries < 1:
        parser.error("--references and --queries must be at least 1")

    started = time.perf_counter()
    result = compare(args.references, args.queries, weights=args.weights, seed=args.seed)
    result["tolerances"] = {key: value * args.scale for key, value in TOLERANCES.items()}
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["command"] = " ".join(
        ["python", "bench/reference_embedding.py", *(argv if argv is not None else sys.argv[1:])]
    )
    errors = {key: result[key] for key in TOLERANCES}
    result["within_tolerance"] = all(errors[key] <= result["tolerances"][key] for key in errors)
    out = args.out or REPO / "bench" / "results" / f"reference-embedding-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for key, value in errors.items():
        print(f"{key}: {value:.2e} (tolerance {result['tolerances'][key]:.0e})")
    print(f"input_max_abs_diff: {result['input_max_abs_diff']:.2e}")
    print(f"wrote {out}; {'within' if result['within_tolerance'] else 'OUTSIDE'} tolerance")
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
