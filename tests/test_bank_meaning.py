"""A bank that passes validation always scores: what `load_bank` checks beyond integrity.

The bank_id is a hash anyone can recompute, so every forged bank here has consistent checksums and bank_id
(:func:`tests.bank_tamper.tamper`); only the meaning checks can refuse it, each with one line.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import expert.backbone
from expert.bank import is_bank_file, load_bank
from expert.bank_checks import expected_grid
from expert.bank_schema import PATCH_FEATURE_DIM, PATCH_STRIDE, BankError
from tests.bank_tamper import fake_onnx, shrink_features, tamper
from tests.test_bank import onnx_file, saved  # noqa: F401 - fixtures


def _refused(bank_dir, match: str) -> str:
    with pytest.raises(BankError, match=match) as err:
        load_bank(bank_dir)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_constants_follow_the_patch_embedder():
    assert PATCH_FEATURE_DIM == expert.backbone.EMBED_DIM
    assert expected_grid(224) == (28, 28) and expected_grid(32) == (4, 4) and PATCH_STRIDE == 8


def test_a_faithful_bank_loads(saved):  # noqa: F811
    assert load_bank(saved).meta.dims.feature_dim == PATCH_FEATURE_DIM


def test_the_issues_crafted_bank_is_refused(saved):  # noqa: F811
    meta, tensors = shrink_features(dim=16, grid=7, tau=-1.0)
    tamper(saved, meta=meta, tensors=tensors)
    message = _refused(saved, "dims.feature_dim 16 does not fit the backbone")
    assert "1024" in message


def test_feature_dim_must_fit_the_backbone(saved):  # noqa: F811
    meta, tensors = shrink_features(dim=16, grid=28, tau=6.5)
    tamper(saved, meta=meta, tensors=tensors)
    _refused(saved, "dims.feature_dim 16")


def test_grid_must_fit_the_crop(saved):  # noqa: F811
    def grid(raw):
        raw["dims"].update(grid_h=7, grid_w=7)
        raw["counts"]["patches"] = 3 * 49

    tamper(saved, meta=grid)
    _refused(saved, r"dims grid 7x7 does not fit preprocessing.crop 224 \(the backbone gives 28x28 patches\)")


def test_descriptor_dim_must_equal_feature_dim(saved):  # noqa: F811
    def meta(raw):
        raw["dims"]["descriptor_dim"] = 8

    def tensors(arrays):
        arrays["global_descriptors"] = np.ascontiguousarray(arrays["global_descriptors"][:, :8])

    tamper(saved, meta=meta, tensors=tensors)
    _refused(saved, "descriptor_dim 8 != dims.feature_dim 1024")


def test_coreset_cannot_exceed_the_patches(saved):  # noqa: F811
    def meta(raw):
        raw["counts"]["coreset"] = 3000
        raw["counts"]["patches"] = 3 * 784

    def tensors(arrays):
        arrays["memory_bank"] = np.zeros((3000, 1024), np.float32)
        arrays["coreset_image_ids"] = np.zeros(3000, np.int64)

    tamper(saved, meta=meta, tensors=tensors)
    _refused(saved, "counts.coreset 3000 > counts.patches 2352")


@pytest.mark.parametrize("tau", [-1.0, 0.0, 6.6, 1e30])
def test_tau_must_follow_from_the_training_scores(saved, tau):  # noqa: F811
    tamper(saved, meta=lambda raw: raw["threshold"].update(tau=tau))
    _refused(saved, r"threshold.tau .* does not follow from train_scores \(k_sigma with \{'kappa': 3.0\} gives 6.5\)")


def test_tau_within_rounding_is_accepted(saved):  # noqa: F811
    tamper(saved, meta=lambda raw: raw["threshold"].update(tau=6.5 * (1 + 1e-7)))
    assert load_bank(saved).tau == pytest.approx(6.5)


def test_s_max_must_be_the_largest_training_score(saved):  # noqa: F811
    tamper(saved, meta=lambda raw: raw["threshold"].update(s_max=9.0))
    _refused(saved, r"threshold.s_max 9 != max\(train_scores\) 5.5")


def test_training_scores_must_give_the_recorded_tau(saved):  # noqa: F811
    tamper(saved, tensors=lambda arrays: arrays.update(train_scores=np.array([1.0, 5.5], np.float32)))
    _refused(saved, "threshold.tau 6.5 does not follow from train_scores")


def test_threshold_parameters_must_be_usable(saved):  # noqa: F811
    tamper(saved, meta=lambda raw: raw["threshold"].update(params={"sigma": 3.0}))
    _refused(saved, "threshold cannot be recomputed from train_scores .*unknown parameter")


def test_every_memory_bank_row_must_be_finite(saved):  # noqa: F811
    def tensors(arrays):
        arrays["memory_bank"][7, 100] = np.inf

    tamper(saved, tensors=tensors)
    _refused(saved, "memory_bank contains NaN or infinite values")


@pytest.mark.parametrize(
    ("signature", "match"),
    [
        ({"input_dims": ("batch", 3, 192, 192)}, r"graph input 'images' has shape \[\?, 3, 192, 192\]"),
        ({"input_dims": ("batch", 3, 224)}, r"graph input 'images' has shape \[\?, 3, 224\]"),
        ({"input_dims": (8, 3, 224, 224)}, r"graph input 'images' has shape \[8, 3, 224, 224\]"),
        ({"output_dims": ("batch", 49, 16)}, r"graph output 'patch_features' has shape \[\?, 49, 16\]; .*784, 1024"),
        ({"output_dims": ("batch", 784)}, "graph output 'patch_features'"),
    ],
)
def test_onnx_signature_must_fit_the_bank(saved, signature, match):  # noqa: F811
    tamper(saved, onnx_bytes=fake_onnx(**signature))
    _refused(saved, match)


def test_onnx_batch_of_one_and_free_dims_are_accepted(saved):  # noqa: F811
    tamper(saved, onnx_bytes=fake_onnx(input_dims=(1, 3, 224, 224), output_dims=("b", "p", "d")))
    assert load_bank(saved).has_onnx


def test_onnx_must_be_readable_and_self_contained(saved):  # noqa: F811
    tamper(saved, onnx_bytes=b"\x08\x07 this is not a protobuf \xff\xff")
    _refused(saved, "backbone.onnx: not a readable ONNX model")

    model = onnx.load_from_string(fake_onnx())
    weight = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [0.0])
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("float_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"
    model.graph.initializer.append(weight)
    tamper(saved, onnx_bytes=model.SerializeToString())
    _refused(saved, "external tensor data")


def test_bank_file_names():
    assert all(is_bank_file(n) for n in ["meta.json", "bank.safetensors", "backbone.onnx", "references/0000.png"])
    assert not any(
        is_bank_file(n) for n in ["notes.txt", "references/a.png", "x/meta.json", "references/0001.png/x", "run.py"]
    )
