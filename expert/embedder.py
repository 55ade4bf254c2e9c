"""Run the patch embedding: in torch (export and fallback) or through onnxruntime (the fast path).

Both runtimes take a float32 ``[B, 3, H, W]`` batch (see :func:`expert.preprocess.preprocess`) and return
float32 ``[B, 784, 1024]`` patch features; :func:`embed_images` does preprocessing and batching.

Example:
    >>> import numpy as np
    >>> from expert.config import ExpertSettings
    >>> from expert.backbone import build_patch_embedder
    >>> from expert.weights import load_backbone
    >>> embedder = TorchEmbedder(build_patch_embedder(load_backbone(ExpertSettings(weights="random"))[0]))
    >>> features, geometries = embed_images(embedder, [np.zeros((240, 320, 3), np.uint8)])
    >>> features.shape, geometries[0].inspected_region()
    ((1, 784, 1024), (54, 15, 265, 225))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from common.progress import ProgressCallback, report
from expert.errors import ExpertError
from expert.preprocess import Geometry, Normalization, preprocess

ONNX_INPUT_NAME = "images"
ONNX_OUTPUT_NAME = "patch_features"
ONNX_OPSET = 20
"""The ONNX opset every export targets (explicit: it is part of :class:`expert.onnx_cache.ExportKey`)."""

CPU_MAX_BATCH = 8
"""Largest batch one onnxruntime CPU run gets (:class:`OnnxEmbedder` splits larger ones): onnxruntime's arena
keeps the largest run's activations. With the folded pooling (:func:`expert.backbone.folded_pooling`) a batch of
8 peaks at ~0.3 GB above the session's weights (0.28 GB at 2); the literal unfold-and-pool graph needed 1.5 GB
at 8, ~170 MB per image."""


class OnnxExportError(ExpertError, RuntimeError):
    """The exported ONNX graph is not what was asked for (e.g. its batch dimension is not dynamic)."""

    code = "onnx_export_failed"


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps a float32 ``[B, 3, H, W]`` batch to float32 ``[B, 784, 1024]`` patch features."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Embed one batch."""
        ...


class TorchEmbedder:
    """Run a :class:`expert.backbone.PatchEmbedder` in torch (no autograd, eval mode).

    Args:
        module: the patch embedder.
        device: torch device to run on; defaults to the module's.
    """

    def __init__(self, module: torch.nn.Module, device: str | torch.device | None = None):
        self.module = module.eval()
        self.device = torch.device(device) if device is not None else _module_device(module)
        self.module.to(self.device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Embed ``batch`` (float32 ``[B, 3, H, W]``) → float32 ``[B, 784, 1024]``."""
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            result: np.ndarray = self.module(tensor).float().cpu().numpy()
            return result


def _module_device(module: torch.nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def default_providers() -> list[str]:
    """Return the onnxruntime providers to use: CUDA first when this build and machine offer it, then CPU.

    Example:
        >>> default_providers()[-1]
        'CPUExecutionProvider'
    """
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider",) if p in available]
    return providers + ["CPUExecutionProvider"]


def providers_for(precision: str) -> list[str]:
    """The onnxruntime providers for a graph of ``precision``: :func:`default_providers` for fp32, CPU for int8.

    onnxruntime's integer convolution kernels are CPU kernels; on CUDA an int8 graph would run its quantised
    operators node by node in float with copies in between, slower than the fp32 graph there.

    Example:
        >>> providers_for("int8")
        ['CPUExecutionProvider']
    """
    return ["CPUExecutionProvider"] if precision == "int8" else default_providers()


class OnnxEmbedder:
    """Run an exported patch embedder (see :func:`export_onnx`) with onnxruntime.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers; default :func:`default_providers`.
        intra_op_threads: onnxruntime intra-op threads (0: onnxruntime's default, all cores).
        spin: let onnxruntime's idle worker threads busy-wait for the next run (its default). Off by default: after
            a run the spinning threads keep every core busy while faiss, the anomaly map and the boxes run next
            (measured on 2 cores: the stages after ``embed`` took twice as long).
        max_batch: largest batch per onnxruntime run (larger ones are split, results are the same); default
            :data:`CPU_MAX_BATCH` on CPU (bounded memory), unlimited when CUDA runs the graph.

    Attributes:
        providers: the providers the session actually uses.
        max_batch: the resolved per-run batch limit (None: unlimited).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        *,
        intra_op_threads: int = 0,
        spin: bool = False,
        max_batch: int | None = None,
    ):
        import onnxruntime

        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = list(providers or default_providers())
        # Full fp32 on CUDA (no TF32): the bank's thresholds were computed with exact fp32 features.
        chosen_with_options: list[str | tuple[str, dict[str, int]]] = [
            ("CUDAExecutionProvider", {"use_tf32": 0}) if p == "CUDAExecutionProvider" else p for p in chosen
        ]
        self.session = onnxruntime.InferenceSession(str(self.path), sess_options=options, providers=chosen_with_options)
        self.providers: list[str] = self.session.get_providers()
        self._input = self.session.get_inputs()[0].name
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        self.max_batch: int | None = max_batch if max_batch is not None else (CPU_MAX_BATCH if on_cpu else None)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Embed ``batch`` (float32 ``[B, 3, H, W]``) → float32 ``[B, 784, 1024]``, ``max_batch`` at a time."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.max_batch or len(batch)
        if len(batch) <= step:
            result: np.ndarray = self.session.run(None, {self._input: batch})[0]
            return result
        out: np.ndarray | None = None
        for start in range(0, len(batch), step):
            part = self.session.run(None, {self._input: batch[start : start + step]})[0]
            if out is None:
                out = np.empty((len(batch), *part.shape[1:]), dtype=np.float32)
            out[start : start + len(part)] = part
        assert out is not None  # the batch is longer than one step here
        return out


def onnx_input_shape(path: str | Path) -> list[int | str]:
    """Return the first graph input's shape: ints for fixed dims, names for symbolic (dynamic) ones.

    Example:
        ``onnx_input_shape("backbone.onnx")`` → ``['batch', 3, 224, 224]``
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in dims]


def export_onnx(module: torch.nn.Module, path: str | Path, *, input_size: int = 224, opset: int = ONNX_OPSET) -> Path:
    """Export the patch embedder to one self-contained ONNX file with a dynamic batch dimension.

    Uses the dynamo exporter (the legacy one cannot export ``adaptive_avg_pool1d``) with a batch-2 example
    (a batch-1 example silently fixes batch = 1) and an explicit dynamic batch dim, then checks the written
    graph: its input must be ``[<symbolic>, 3, input_size, input_size]``.

    Args:
        module: the :class:`expert.backbone.PatchEmbedder` (moved to CPU for export, left in eval mode).
        path: output ``.onnx`` path (parent directories are created).
        input_size: the square network input size.
        opset: the ONNX opset to target.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OnnxExportError: if the written graph's batch dimension is not dynamic or its shape is otherwise wrong.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    example = torch.zeros(2, 3, input_size, input_size, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {type(module).__name__}")
    program.save(str(path), external_data=False)
    del program  # the exported program holds a second copy of the weights: free it before checking
    shape = onnx_input_shape(path)
    if len(shape) != 4 or not isinstance(shape[0], str) or shape[1:] != [3, input_size, input_size]:
        raise OnnxExportError(
            f"exported ONNX graph {str(path)!r} has input shape {shape}; expected [batch, 3, {input_size}, "
            f"{input_size}] with a dynamic batch dimension"
        )
    return path


def embed_images(
    embedder: Embedder,
    images: Sequence[np.ndarray],
    *,
    resize: int = 256,
    crop: int = 224,
    center_crop: bool = True,
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
    normalization: Normalization | None = None,
) -> tuple[np.ndarray, list[Geometry]]:
    """Preprocess and embed images in batches.

    Args:
        embedder: a :class:`TorchEmbedder`, :class:`OnnxEmbedder` or any :class:`Embedder`.
        images: RGB uint8 ``H × W × 3`` arrays (any sizes).
        resize: see :func:`expert.preprocess.preprocess`.
        crop: see :func:`expert.preprocess.preprocess`.
        center_crop: see :func:`expert.preprocess.preprocess`.
        batch_size: images per forward pass.
        progress: ``progress("embed", fraction)`` after each batch (nothing is printed).
        normalization: the backbone's input statistics (see :func:`expert.preprocess.preprocess`).

    Returns:
        ``(features, geometries)``: float32 ``[N, P, D]`` (P = 784, D = 1024 at 224) and one
        :class:`~expert.preprocess.Geometry` per image.

    Raises:
        ValueError: for an empty ``images`` list or ``batch_size < 1``.
    """
    if len(images) == 0:
        raise ValueError("embed_images needs at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features: list[np.ndarray] = []
    geometries: list[Geometry] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prepared = [
            preprocess(image, resize=resize, crop=crop, center_crop=center_crop, normalization=normalization)
            for image in chunk
        ]
        batch = np.stack([tensor for tensor, _ in prepared])
        features.append(np.asarray(embedder(batch), dtype=np.float32))
        geometries.extend(geometry for _, geometry in prepared)
        report(progress, "embed", (start + len(chunk)) / len(images))
    return np.concatenate(features, axis=0), geometries
