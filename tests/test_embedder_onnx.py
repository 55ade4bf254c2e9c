"""ONNX export (dynamic batch) and onnxruntime parity with torch; batching through embed_images."""

from __future__ import annotations

import numpy as np
import pytest

from expert.embedder import (
    Embedder,
    OnnxEmbedder,
    TorchEmbedder,
    default_providers,
    embed_images,
    export_onnx,
    onnx_input_shape,
)
from expert.preprocess import compute_geometry, preprocess
from tests.synthetic import make_good_image


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory, patch_embedder):
    return export_onnx(patch_embedder, tmp_path_factory.mktemp("onnx") / "backbone.onnx")


@pytest.fixture(scope="module")
def onnx_embedder(onnx_path):
    return OnnxEmbedder(onnx_path, intra_op_threads=2)


@pytest.fixture(scope="module")
def torch_embedder(patch_embedder):
    return TorchEmbedder(patch_embedder)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_exported_graph_has_a_dynamic_batch_dimension(onnx_path):
    import onnx

    shape = onnx_input_shape(onnx_path)
    assert isinstance(shape[0], str) and shape[1:] == [3, 224, 224]
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    output_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert output_dims[0].dim_param == shape[0]  # the same symbol: batch in = batch out
    assert [d.dim_value for d in output_dims[1:]] == [784, 1024]
    assert not list(onnx_path.parent.glob("*.data"))  # one self-contained file


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch(onnx_embedder, torch_embedder, batch):
    images = [make_good_image(224 + 16 * i, 240, np.random.default_rng(i)) for i in range(batch)]
    inputs = np.stack([preprocess(image)[0] for image in images])
    got, expected = onnx_embedder(inputs), torch_embedder(inputs)
    assert got.shape == expected.shape == (batch, 784, 1024) and got.dtype == np.float32
    assert relative_error(got, expected) < 1e-4


def test_providers_fall_back_to_cpu(onnx_embedder, torch_embedder):
    import onnxruntime

    providers = default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers) == ("CUDAExecutionProvider" in onnxruntime.get_available_providers())
    assert onnx_embedder.providers[-1] == "CPUExecutionProvider"
    assert isinstance(onnx_embedder, Embedder) and isinstance(torch_embedder, Embedder)


def test_embed_images_batches_and_keeps_each_geometry(onnx_embedder):
    sizes = [(224, 224), (240, 320), (300, 200)]
    images = [make_good_image(h, w, np.random.default_rng(10 + i)) for i, (h, w) in enumerate(sizes)]
    features, geometries = embed_images(onnx_embedder, images, batch_size=2)
    assert features.shape == (3, 784, 1024) and features.dtype == np.float32
    assert geometries == [compute_geometry(h, w) for h, w in sizes]
    singles = np.concatenate([onnx_embedder(preprocess(image)[0][None]) for image in images])
    assert relative_error(features, singles) < 1e-5
    _, no_crop = embed_images(onnx_embedder, images[1:2], center_crop=False)
    assert no_crop[0].inspected_region() == (0, 0, 320, 240)


def test_embed_images_refuses_empty_input(onnx_embedder):
    with pytest.raises(ValueError, match="at least one image"):
        embed_images(onnx_embedder, [])
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(onnx_embedder, [np.zeros((8, 8, 3), np.uint8)], batch_size=0)


def test_large_batches_are_split_on_cpu_with_the_same_features(onnx_path, onnx_embedder):
    from expert.embedder import CPU_MAX_BATCH

    assert onnx_embedder.max_batch == CPU_MAX_BATCH  # bounded onnxruntime arena on CPU
    images = [make_good_image(224, 240, np.random.default_rng(20 + i)) for i in range(3)]
    inputs = np.stack([preprocess(image)[0] for image in images])
    one_at_a_time = OnnxEmbedder(onnx_path, intra_op_threads=2, max_batch=1)
    got = one_at_a_time(inputs)
    assert got.shape == (3, 784, 1024) and got.dtype == np.float32 and got.flags.c_contiguous
    assert relative_error(got, onnx_embedder(inputs)) < 1e-5
    with pytest.raises(ValueError, match="max_batch"):
        OnnxEmbedder(onnx_path, max_batch=0)


def test_export_targets_the_pinned_opset(onnx_path):
    import onnx

    from expert.embedder import ONNX_OPSET

    model = onnx.load(str(onnx_path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == ONNX_OPSET
