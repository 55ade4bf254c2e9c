"""Patch embedding (shapes and exact pooling identities) and backbone weight loading (hub/file/random)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eagle.settings import ExpertSettings
from expert.backbone import build_patch_embedder, local_neighbourhoods, pool_to
from expert.weights import BackboneWeightsError, WeightsInfo, load_backbone, state_dict_checksum

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- numpy references


def np_adaptive_pool(vector: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling by its definition: output i = mean(v[floor(i·L/n) : ceil((i+1)·L/n)])."""
    length = vector.shape[-1]
    out = np.empty(vector.shape[:-1] + (size,), np.float64)
    for i in range(size):
        start, end = (i * length) // size, math.ceil((i + 1) * length / size)
        out[..., i] = vector[..., start:end].mean(axis=-1)
    return out


def np_neighbourhood(feature: np.ndarray, y: int, x: int) -> np.ndarray:
    """The C·9 vector of position (y, x): channel-major (c, ky, kx), zero padding 1."""
    padded = np.pad(feature, ((0, 0), (1, 1), (1, 1)))
    return padded[:, y : y + 3, x : x + 3].reshape(-1)


def np_bilinear_weights(out_index: int, in_size: int, out_size: int) -> list[tuple[int, float]]:
    """Source indices and weights of F.interpolate(bilinear, align_corners=False) along one axis."""
    src = max((out_index + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(math.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = src - i0
    return [(i0, 1.0 - frac), (i1, frac)]


def np_patch_embedding(layer2: np.ndarray, layer3: np.ndarray, y: int, x: int) -> np.ndarray:
    """One patch's 1024-d embedding, written out from the raw layer maps (one image, float64)."""
    v2 = np_neighbourhood(layer2, y, x)
    v3 = np.zeros(layer3.shape[0] * 9)
    h3, w3 = layer3.shape[1:]
    for iy, wy in np_bilinear_weights(y, h3, layer2.shape[1]):
        for ix, wx in np_bilinear_weights(x, w3, layer2.shape[2]):
            v3 += wy * wx * np_neighbourhood(layer3, iy, ix)
    stacked = np.concatenate([np_adaptive_pool(v2, 1024), np_adaptive_pool(v3, 1024)])
    return np_adaptive_pool(stacked, 1024)


# ----------------------------------------------------------------------------- pooling identities


@pytest.mark.parametrize("length", [4608, 9216, 2048, 1030])
def test_pool_to_matches_the_index_range_definition(length):
    vectors = torch.from_numpy(np.random.default_rng(length).normal(size=(3, length)))
    expected = np_adaptive_pool(vectors.numpy(), 1024)
    np.testing.assert_allclose(pool_to(vectors, 1024).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_pool_of_a_constant_is_that_constant():
    assert torch.equal(pool_to(torch.full((2, 4608), 2.5), 1024), torch.full((2, 1024), 2.5))


def test_pool_of_an_exact_multiple_is_the_mean_of_consecutive_blocks():
    vectors = torch.arange(9216, dtype=torch.float64).reshape(1, 9216)
    pooled = pool_to(vectors, 1024)
    # 9216 / 1024 = 9: block i is 9i..9i+8, mean 9i + 4 — for layer3 that is one channel's 3×3 neighbourhood.
    assert torch.equal(pooled[0], torch.arange(1024, dtype=torch.float64) * 9 + 4)


def test_local_neighbourhoods_is_zero_padded_channel_major_unfold():
    feature = np.random.default_rng(0).normal(size=(1, 4, 5, 6))
    unfolded = local_neighbourhoods(torch.from_numpy(feature)).numpy()
    assert unfolded.shape == (1, 36, 5, 6)
    for y, x in [(0, 0), (4, 5), (2, 3), (0, 5)]:
        np.testing.assert_array_equal(unfolded[0, :, y, x], np_neighbourhood(feature[0], y, x))


# ----------------------------------------------------------------------------- the embedding


@pytest.fixture(scope="module")
def embedded_example(random_backbone, patch_embedder):
    image = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        layer2, layer3 = random_backbone(image)
        return layer2, layer3, patch_embedder.embed_features(layer2, layer3), patch_embedder(image)


def test_backbone_outputs_layer2_and_layer3(embedded_example):
    layer2, layer3, _, _ = embedded_example
    assert tuple(layer2.shape) == (1, 512, 28, 28)
    assert tuple(layer3.shape) == (1, 1024, 14, 14)


def test_embedding_shape_and_grid(patch_embedder, embedded_example):
    _, _, from_features, from_image = embedded_example
    assert patch_embedder.grid_size == (28, 28)
    assert tuple(from_image.shape) == (1, 784, 1024)
    assert from_image.dtype == torch.float32
    torch.testing.assert_close(from_image, from_features, rtol=0, atol=0)


@pytest.mark.parametrize("y,x", [(0, 0), (27, 27), (13, 5), (0, 27), (14, 20)])
def test_one_patch_matches_a_hand_written_numpy_embedding(embedded_example, y, x):
    layer2, layer3, embedding, _ = embedded_example
    expected = np_patch_embedding(layer2[0].double().numpy(), layer3[0].double().numpy(), y, x)
    got = embedding[0, y * 28 + x].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_final_pool_averages_pairs_and_layer3_half_is_channel_pair_means(embedded_example):
    layer2, layer3, embedding, _ = embedded_example
    # 2048 -> 1024 averages pairs; 9216 -> 1024 averages each channel's 9 neighbours: so output 512 + j is the
    # mean of the 18 interpolated neighbourhood values of layer3 channels 2j and 2j+1.
    y, x = 7, 11
    near3 = torch.nn.functional.interpolate(
        local_neighbourhoods(layer3.double()), size=(28, 28), mode="bilinear", align_corners=False
    )[0, :, y, x].numpy()
    expected = near3.reshape(512, 18).mean(axis=1)
    np.testing.assert_allclose(embedding[0, y * 28 + x, 512:].double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_batch_items_are_embedded_independently(patch_embedder):
    # A 64×64 input (8×8 grid) keeps this cheap; the computation is the same at any size.
    images = torch.from_numpy(np.random.default_rng(5).normal(size=(2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        both = patch_embedder(images)
        second = patch_embedder(images[1:])
    assert tuple(both.shape) == (2, 64, 1024)
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- weights


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(random_backbone_loaded):
    state = torch.get_rng_state()
    module, info = load_backbone(ExpertSettings(weights="random", seed=0))
    assert torch.equal(torch.get_rng_state(), state)
    assert info == random_backbone_loaded[1]
    assert info.source == "random:seed=0" and info.is_random
    assert info.checksum == state_dict_checksum(random_backbone_loaded[0])
    _, other = load_backbone(ExpertSettings(weights="random", seed=1))
    assert other.checksum != info.checksum
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())


def test_checksum_is_sha256_over_sorted_keys():
    import hashlib

    linear = torch.nn.Linear(2, 3)
    digest = hashlib.sha256()
    state = linear.state_dict()
    for key in sorted(state):
        tensor = state[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    assert state_dict_checksum(linear) == "sha256:" + digest.hexdigest()
    with torch.no_grad():
        linear.bias[0] += 1.0
    assert state_dict_checksum(linear) != "sha256:" + digest.hexdigest()


def test_file_weights_round_trip(tmp_path, random_backbone_loaded, embedded_example):
    module, info = random_backbone_loaded
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    loaded, loaded_info = load_backbone(ExpertSettings(weights="file", weights_path=path))
    assert loaded_info == WeightsInfo(source=f"file:{path.resolve()}", checksum=info.checksum)
    image = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        embedding = build_patch_embedder(loaded)(image)
    torch.testing.assert_close(embedding, embedded_example[3], rtol=0, atol=0)


def test_file_weights_accept_the_full_classifier_state_dict(tmp_path):
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        full = timm.create_model("wide_resnet50_2", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    loaded, _ = load_backbone(ExpertSettings(weights="file", weights_path=path))
    assert torch.equal(loaded.state_dict()["layer3.5.conv3.weight"], full.state_dict()["layer3.5.conv3.weight"])
    assert "fc.weight" not in loaded.state_dict()


@pytest.mark.parametrize(
    "filename,content,needle",
    [
        ("weights.pt", b"anything", "not a .safetensors file"),
        ("missing.safetensors", None, "does not exist"),
        ("garbage.safetensors", b"this is not safetensors", "not a readable safetensors file"),
    ],
)
def test_bad_weight_files_give_one_line_errors(tmp_path, filename, content, needle):
    path = tmp_path / filename
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BackboneWeightsError, match=needle) as caught:
        load_backbone(ExpertSettings(weights="file", weights_path=path))
    assert "\n" not in str(caught.value)


def test_weights_that_do_not_fit_name_the_tensor(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    with pytest.raises(BackboneWeightsError, match="tensors missing"):
        load_backbone(ExpertSettings(weights="file", weights_path=path))


@pytest.mark.slow
def test_hub_offline_with_an_empty_cache_says_how_to_provide_weights(tmp_path):
    # A fresh interpreter: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported.
    code = (
        "from eagle.settings import ExpertSettings\n"
        "from expert.weights import BackboneWeightsError, load_backbone\n"
        "try:\n"
        "    load_backbone(ExpertSettings(weights='hub'))\n"
        "except BackboneWeightsError as err:\n"
        "    print('ERROR:' + str(err))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, result.stdout + result.stderr
    message = lines[0]
    assert "wide_resnet50_2.tv_in1k" in message
    assert "EAGLE_EXPERT__WEIGHTS_PATH" in message and "HF_HOME" in message
