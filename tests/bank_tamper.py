"""Forge banks the way an attacker would: edit meta.json, tensors or the ONNX file, then recompute every checksum
and the bank_id, so that only the meaning checks (and the test inspection) can tell that the bank is broken."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from expert.bank import file_sha256
from expert.bank_schema import META_FILE, ONNX_FILE, TENSORS_FILE, BankMeta, compute_bank_id


def overwrite(path: Path, data: bytes) -> None:
    """Replace one bank file's bytes without touching its other names.

    ``backbone.onnx`` and the reference PNGs are hard links shared with the ONNX cache and other bank versions
    (:func:`common.atomic.link_or_copy`); writing into one in place would damage all of them, so the name is
    unlinked first and a new file written in its place.
    """
    path.unlink()
    path.write_bytes(data)


def tamper(
    bank_dir: Path,
    *,
    meta: Callable[[dict[str, Any]], None] | None = None,
    tensors: Callable[[dict[str, np.ndarray]], None] | None = None,
    onnx_bytes: bytes | None = None,
) -> Path:
    """Apply the edits, then make checksums and bank_id consistent again (what `load_bank`'s integrity checks see)."""
    raw = json.loads((bank_dir / META_FILE).read_text())
    arrays = load_file(str(bank_dir / TENSORS_FILE))
    if meta is not None:
        meta(raw)
    if tensors is not None:
        tensors(arrays)
    if onnx_bytes is not None:
        overwrite(bank_dir / ONNX_FILE, onnx_bytes)
    if (bank_dir / ONNX_FILE).is_file() and raw["backbone"]["onnx_sha256"] is not None:
        raw["backbone"]["onnx_sha256"] = file_sha256(bank_dir / ONNX_FILE)
    save_file(arrays, str(bank_dir / TENSORS_FILE))
    raw["bank_id"] = compute_bank_id(arrays, BankMeta.model_validate(raw))
    (bank_dir / META_FILE).write_text(json.dumps(raw, indent=2))
    return bank_dir


def shrink_features(dim: int = 16, grid: int = 7, tau: float = -1.0) -> tuple[Callable, Callable]:
    """The issue's crafted bank: feature_dim ``dim``, a ``grid`` x ``grid`` patch grid, τ = ``tau``."""

    def meta(raw: dict[str, Any]) -> None:
        raw["dims"].update(feature_dim=dim, descriptor_dim=dim, grid_h=grid, grid_w=grid)
        raw["counts"]["patches"] = raw["counts"]["references"] * grid * grid
        raw["threshold"]["tau"] = tau

    def tensors(arrays: dict[str, np.ndarray]) -> None:
        arrays["memory_bank"] = np.ascontiguousarray(arrays["memory_bank"][:, :dim])
        arrays["global_descriptors"] = np.ascontiguousarray(arrays["global_descriptors"][:, :dim])

    return meta, tensors


def fake_onnx(*, input_dims: tuple = ("batch", 3, 224, 224), output_dims: tuple = ("batch", 784, 1024)) -> bytes:
    """A valid ONNX graph with the given signature whose one node is an Identity (it runs, but gives wrong shapes)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["patch_features"])],
        "fake",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info("patch_features", TensorProto.FLOAT, list(output_dims))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def hash_bank(tensors: dict[str, np.ndarray], described: dict[str, Any]) -> str:
    """A bank_id written out by hand: sha256 over the tensors (name, dtype, shape, bytes) and ``described`` as JSON.

    Tests of old bank formats build ``described`` the way the EAGLE of that time did (which fields it left out) and
    check that today's :func:`compute_bank_id` still gives the same id.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    digest.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:16]
