"""The int8 feature extractor: the exported patch embedder quantised statically, calibrated on a bank's references.

``EAGLE_EXPERT__PRECISION=int8`` makes :func:`expert.build.build_bank` take the fp32 graph from the export cache
(:mod:`expert.onnx_cache`) and quantise it with onnxruntime's static quantisation
(``onnxruntime.quantization.quantize_static``; the recipe is :data:`DEFAULT_RECIPE`: QDQ format, uint8 activations
per tensor, int8 weights per output channel, min/max calibration, only the Conv nodes quantised and the last two of
them kept float32) before embedding the references with it. The
bank then carries the int8 graph as its ``backbone.onnx``, so its memory bank, τ and s_max are computed with the
very extractor that scores queries, and ``meta.json`` records ``backbone.precision = "int8"`` and the recipe.

Calibration is per bank: the activation ranges are measured on (at most :data:`MAX_CALIBRATION_IMAGES`, evenly
spaced) of the bank's own reference images, preprocessed exactly as queries are. The ranges then fit the product
the bank inspects rather than a generic image set, so normal images (whose scores decide the threshold and the
verdicts near it) are represented with the finest steps. Activations of a defect far outside that range are
clipped: its score comes out lower than in fp32, yet still many times τ (bench/README.md, precision). The price
is that the graph depends on the references: its cache key (:class:`QuantKey`) holds a digest of the calibration
tensors, so teaching a bank (new references) quantises again (~5-7 s on 2 cores for 20-32 images), while
rebuilding the same references hits the cache.

Example:
    >>> from expert.config import ExpertSettings
    >>> from expert.onnx_cache import ExportKey
    >>> base = ExportKey.create("wrn", "sha256:00", crop=224)
    >>> a = QuantKey.create(base, calibration_digest(np.zeros((2, 3, 224, 224), np.float32)))
    >>> b = QuantKey.create(base, calibration_digest(np.ones((2, 3, 224, 224), np.float32)))
    >>> a.digest() == b.digest(), a.as_dict()["base"] == base.as_dict()
    (False, True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from expert.bank_schema import QuantizationMeta
from expert.embedder import ONNX_INPUT_NAME
from expert.onnx_cache import CACHE_FORMAT, ExportKey, OnnxCache
from expert.preprocess import Normalization, preprocess

__all__ = [
    "DEFAULT_RECIPE",
    "MAX_CALIBRATION_IMAGES",
    "QuantKey",
    "QuantRecipe",
    "calibration_digest",
    "calibration_tensors",
    "fp32_nodes",
    "int8_graph",
    "quantize_graph",
]

log = logging.getLogger(__name__)

MAX_CALIBRATION_IMAGES = 32
"""Most reference images the activation ranges are calibrated on (evenly spaced over the references)."""


@dataclass(frozen=True)
class QuantRecipe:
    """How the graph is quantised (every field is part of :class:`QuantKey`).

    Attributes:
        format: ``qdq`` (QuantizeLinear/DequantizeLinear pairs around float operators, which onnxruntime fuses
            into integer kernels) or ``qoperator`` (QLinearConv and friends written out).
        activations: activation type, per tensor (``uint8``: the type onnxruntime's x86 kernels are fastest with).
        weights: weight type (``int8``, symmetric).
        per_channel: one weight scale per output channel (needed for accuracy: channel ranges differ a lot).
        method: calibration method (``minmax``: the observed range of every activation).
        max_images: see :data:`MAX_CALIBRATION_IMAGES`.
        symmetric_activations: activation ranges symmetric around zero (onnxruntime ``ActivationSymmetric``).
        fp32_first_convs: how many of the graph's first Conv nodes (in graph order) stay float32.
        fp32_last_convs: how many of its last Conv nodes (the patch pooling, then the last layer3 block) stay
            float32.
        flip_augment: calibrate also on the left-right mirror of every calibration image.
        quantized_ops: ``all`` (every operator onnxruntime can quantise: Conv, the residual Add, Concat, Resize,
            MaxPool) or ``conv`` (only the Conv nodes: their inputs and weights are quantised, while the results
            of the residual sums, the resize and the concatenation of the two layers are not re-quantised).
    """

    format: Literal["qdq", "qoperator"] = "qdq"
    activations: Literal["uint8", "int8"] = "uint8"
    weights: Literal["int8"] = "int8"
    per_channel: bool = True
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    max_images: int = MAX_CALIBRATION_IMAGES
    symmetric_activations: bool = False
    fp32_first_convs: int = 0
    fp32_last_convs: int = 0
    flip_augment: bool = False
    quantized_ops: Literal["all", "conv"] = "all"


DEFAULT_RECIPE = QuantRecipe(quantized_ops="conv", fp32_last_convs=2)
"""The recipe ``precision=int8`` uses: only Conv nodes quantised, the last two (the patch pooling and the last
layer3 block) kept float32. Chosen by ``bench/bench_precision.py`` among the recipe knobs: the one that met the
verdict-agreement goal at u8 speed (docs/models.md). ``QuantRecipe()`` is onnxruntime's plain recipe."""


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _onnxruntime_version() -> str:
    for name in ("onnxruntime", "onnxruntime-gpu"):
        found = _version(name)
        if found != "not installed":
            return found
    return "not installed"


@cache
def quantize_code_fingerprint() -> str:
    """16 hex digits of sha256 over this module's source (a change to the recipe code re-quantises).

    Example:
        >>> len(quantize_code_fingerprint())
        16
    """
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def calibration_digest(batch: np.ndarray) -> str:
    """``sha256:<hex>`` over the calibration tensors' shape and float32 bytes.

    Example:
        >>> calibration_digest(np.zeros((1, 3, 4, 4), np.float32))[:7]
        'sha256:'
    """
    array = np.ascontiguousarray(batch, dtype=np.float32)
    digest = hashlib.sha256(f"{array.shape}|".encode())
    digest.update(array.data.cast("B"))
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class QuantKey:
    """Everything an int8 graph depends on: the fp32 graph's key, the calibration data, the recipe and the tools.

    Attributes:
        base: the :class:`~expert.onnx_cache.ExportKey` of the fp32 graph that is quantised.
        calibration: :func:`calibration_digest` of the calibration tensors (the preprocessed references, so
            the preprocessing is covered too).
        recipe: the :class:`QuantRecipe`.
        onnxruntime_version: the quantiser's version.
        onnx_version: the installed onnx (the quantiser rewrites the graph with it).
        code: :func:`quantize_code_fingerprint`.
    """

    base: ExportKey
    calibration: str
    recipe: QuantRecipe = field(default=DEFAULT_RECIPE)
    onnxruntime_version: str = ""
    onnx_version: str = ""
    code: str = ""

    @classmethod
    def create(cls, base: ExportKey, calibration: str, recipe: QuantRecipe = DEFAULT_RECIPE) -> QuantKey:
        """The key for quantising ``base``'s graph on calibration data with ``calibration`` as its digest."""
        return cls(
            base=base,
            calibration=calibration,
            recipe=recipe,
            onnxruntime_version=_onnxruntime_version(),
            onnx_version=_version("onnx"),
            code=quantize_code_fingerprint(),
        )

    def as_dict(self) -> dict[str, Any]:
        """The key as a JSON-ready dict (stored in the sidecar; ``base`` is the fp32 key's own dict)."""
        return {
            "format": CACHE_FORMAT,
            "precision": "int8",
            "base": self.base.as_dict(),
            "calibration": self.calibration,
            "recipe": asdict(self.recipe),
            "onnxruntime_version": self.onnxruntime_version,
            "onnx_version": self.onnx_version,
            "code": self.code,
        }

    def digest(self) -> str:
        """24 hex digits of sha256 over the canonical JSON of :meth:`as_dict`: the entry's file name."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def calibration_indices(count: int, limit: int = MAX_CALIBRATION_IMAGES) -> list[int]:
    """At most ``limit`` evenly spaced indices of ``count`` references (all of them when ``count <= limit``).

    Example:
        >>> calibration_indices(5, 3), calibration_indices(2, 3)
        ([0, 2, 4], [0, 1])
    """
    if count <= limit:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


def calibration_tensors(
    images: Sequence[np.ndarray],
    *,
    resize: int,
    crop: int,
    center_crop: bool,
    normalization: Normalization,
    limit: int = MAX_CALIBRATION_IMAGES,
    flip_augment: bool = DEFAULT_RECIPE.flip_augment,
) -> np.ndarray:
    """The network inputs the activation ranges are calibrated on: float32 ``[n, 3, crop, crop]``.

    The references are preprocessed exactly as queries are (:func:`expert.preprocess.preprocess`); n ≤ ``limit``,
    or ≤ 2 × ``limit`` with ``flip_augment`` (every image and its left-right mirror).
    """
    if not images:
        raise ValueError("int8 calibration needs at least one reference image")
    chosen = [images[i] for i in calibration_indices(len(images), limit)]
    batch = np.stack(
        [
            preprocess(image, resize=resize, crop=crop, center_crop=center_crop, normalization=normalization)[0]
            for image in chosen
        ]
    ).astype(np.float32)
    if flip_augment:
        batch = np.concatenate([batch, batch[..., ::-1]]).astype(np.float32)
    return np.ascontiguousarray(batch)


def _reader(batch: np.ndarray) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``batch``, one image per run (bounded memory)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.position = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.position >= len(batch):
                return None
            self.position += 1
            return {ONNX_INPUT_NAME: batch[self.position - 1 : self.position]}

    return Reader()


def quantize_graph(
    source: str | Path, target: str | Path, calibration: np.ndarray, recipe: QuantRecipe = DEFAULT_RECIPE
) -> Path:
    """Quantise the fp32 graph ``source`` statically into ``target`` (one self-contained file).

    ``onnxruntime.quantization.quant_pre_process`` (shape inference and graph optimisation, which folds what
    quantisation would otherwise wrap) then ``quantize_static`` with ``recipe``; the input and output stay
    float32 ``[batch, 3, crop, crop]`` → ``[batch, P, D]``, so the graph is a drop-in for the fp32 one.

    Args:
        source: the fp32 graph (:func:`expert.embedder.export_onnx`).
        target: where the int8 graph is written.
        calibration: float32 ``[n, 3, crop, crop]`` network inputs (:func:`calibration_tensors`).
        recipe: the :class:`QuantRecipe`.

    Returns:
        ``target`` as a :class:`~pathlib.Path`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix=".eagle-quant-", dir=target.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        excluded = fp32_nodes(prepared, recipe)
        quantize_static(
            str(prepared),
            str(target),
            _reader(np.ascontiguousarray(calibration, dtype=np.float32)),
            quant_format=QuantFormat.QDQ if recipe.format == "qdq" else QuantFormat.QOperator,
            per_channel=recipe.per_channel,
            activation_type=types[recipe.activations],
            weight_type=types[recipe.weights],
            calibrate_method=methods[recipe.method],
            use_external_data_format=False,
            nodes_to_exclude=excluded,
            op_types_to_quantize=["Conv"] if recipe.quantized_ops == "conv" else None,
            extra_options={"ActivationSymmetric": recipe.symmetric_activations},
        )
    return target


def fp32_nodes(graph: str | Path, recipe: QuantRecipe) -> list[str]:
    """Names of the Conv nodes ``recipe`` keeps in float32 (its first and last Conv nodes, in graph order)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    head = convs[: recipe.fp32_first_convs]
    tail = convs[len(convs) - recipe.fp32_last_convs :] if recipe.fp32_last_convs else []
    return sorted(set(head + tail))


def quantization_meta(key: QuantKey, images: int) -> QuantizationMeta:
    """What the bank records about its int8 graph (``meta.json`` ``backbone.quantization``)."""
    recipe = key.recipe
    return QuantizationMeta(
        tool=f"onnxruntime.quantization {key.onnxruntime_version}",
        format=recipe.format,
        activations=f"{recipe.activations} per tensor",
        weights=f"{recipe.weights} {'per channel' if recipe.per_channel else 'per tensor'}",
        method=recipe.method,
        calibration_images=images,
        calibration_sha256=key.calibration,
        quantized_ops=recipe.quantized_ops,
        fp32_first_convs=recipe.fp32_first_convs,
        fp32_last_convs=recipe.fp32_last_convs,
        symmetric_activations=recipe.symmetric_activations,
        flip_augment=recipe.flip_augment,
    )


def int8_graph(
    cache: OnnxCache,
    base: ExportKey,
    fp32_graph: Path,
    calibration: np.ndarray,
    *,
    recipe: QuantRecipe = DEFAULT_RECIPE,
    fallback_dir: str | Path | None = None,
) -> tuple[Path, QuantizationMeta]:
    """The int8 graph of ``fp32_graph`` calibrated on ``calibration``: from ``cache``, or quantised and cached.

    Args:
        cache: the export cache (the int8 graph is an entry of its own, keyed by :class:`QuantKey`).
        base: the fp32 graph's key.
        fp32_graph: the fp32 graph (``cache.get(base, ...)``).
        calibration: :func:`calibration_tensors` of the bank's references.
        recipe: the :class:`QuantRecipe`.
        fallback_dir: as :meth:`expert.onnx_cache.OnnxCache.get`.

    Returns:
        ``(path, meta)``: the verified int8 graph and what the bank records about it.
    """
    key = QuantKey.create(base, calibration_digest(calibration), recipe)

    def make(path: Path) -> None:
        log.info("quantising the patch embedder to int8 on %d calibration images", len(calibration))
        quantize_graph(fp32_graph, path, calibration, recipe)

    path = cache.get_derived(key, make, what="quantised (int8)", fallback_dir=fallback_dir)
    return path, quantization_meta(key, len(calibration))
