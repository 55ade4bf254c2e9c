"""The int8 expert (expert.quantize): an int8 bank builds, inspects and flags the synthetic defects like fp32.

One fp32 and one int8 bank are built per module from the synthetic normals (seeded random-weight WideResNet-50-2,
the session's shared ONNX cache) and shared by the tests below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError
from safetensors.numpy import load_file
from sklearn.metrics import roc_auc_score

import expert.quantize as quantize_module
from eagle.images import list_images, load_image
from eagle.settings import ExpertSettings, Settings
from expert.bank import load_bank
from expert.bank_checks import QUANTIZED_OPS, _check_onnx
from expert.bank_schema import META_FILE, ONNX_FILE, TENSORS_FILE, BankError
from expert.build import build_bank
from expert.onnx_cache import ExportKey, OnnxCache
from expert.quantize import QuantKey, QuantRecipe, calibration_digest, calibration_indices
from expert.scorer import MAX_SCORE_BATCH, load_expert, make_embedder
from tests.bank_tamper import hash_bank, tamper

pytestmark = pytest.mark.slow

FP32 = ExpertSettings(weights="random", seed=0)
INT8 = ExpertSettings(weights="random", seed=0, precision="int8")


def _read(path: Path) -> np.ndarray:
    return load_image(path, max_pixels=10_000_000)


@pytest.fixture(scope="module")
def references(synthetic_root):
    paths = list_images(synthetic_root / "widget" / "train" / "good")
    return [_read(p) for p in paths], [p.name for p in paths]


@pytest.fixture(scope="module")
def cache() -> OnnxCache:
    return OnnxCache(os.environ["EAGLE_ONNX_CACHE_DIR"])


@pytest.fixture(scope="module")
def quantise_calls(monkeypatch_module):
    calls: list[int] = []
    real = quantize_module.quantize_graph

    def counting(source, target, calibration, recipe=quantize_module.DEFAULT_RECIPE):
        calls.append(len(calibration))
        return real(source, target, calibration, recipe)

    monkeypatch_module.setattr(quantize_module, "quantize_graph", counting)
    return calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def banks(tmp_path_factory, references, random_backbone, random_weights_info, cache, quantise_calls):
    """{"fp32": bank dir, "int8": bank dir} from the same references."""
    images, names = references
    root = tmp_path_factory.mktemp("precision-banks")
    out = {}
    for label, settings in (("fp32", FP32), ("int8", INT8)):
        build_bank(
            images,
            names,
            settings=settings,
            backbone=random_backbone,
            weights_info=random_weights_info,
            out_dir=root / label,
            name=label,
            onnx_cache=cache,
        )
        out[label] = root / label
    return out


@pytest.fixture(scope="module")
def scored(banks, synthetic_root):
    """[(kind, path, fp32 result, int8 result)] for every synthetic test image."""
    fp32, int8 = load_expert(banks["fp32"], FP32), load_expert(banks["int8"], INT8)
    rows = []
    for path in list_images(synthetic_root / "widget" / "test"):
        image = _read(path)
        rows.append((path.parent.name, path, fp32.score(image), int8.score(image)))
    return rows


def _mask_bbox(mask_path: Path) -> tuple[int, int, int, int]:
    mask = np.asarray(load_image(mask_path, max_pixels=10_000_000))[..., 0] > 127
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


# ------------------------------------------------------------------------------------------- the bank
def test_int8_bank_records_its_precision_and_recipe_and_carries_a_quantised_graph(banks, references):
    bank = load_bank(banks["int8"], INT8)
    backbone = bank.meta.backbone
    assert backbone.precision == "int8"
    assert backbone.quantization is not None
    assert backbone.quantization.calibration_images == len(references[0])  # 12 references: all of them
    assert backbone.quantization.format == quantize_module.DEFAULT_RECIPE.format
    assert backbone.quantization.calibration_sha256.startswith("sha256:")
    recipe = quantize_module.DEFAULT_RECIPE
    recorded = backbone.quantization
    knobs = ("quantized_ops", "fp32_first_convs", "fp32_last_convs")
    assert [getattr(recorded, k) for k in knobs] == [getattr(recipe, k) for k in knobs] == ["conv", 0, 2]
    assert (recorded.symmetric_activations, recorded.flip_augment) == (False, False)
    ops = {node.op_type for node in onnx.load(str(banks["int8"] / ONNX_FILE)).graph.node}
    assert ops & QUANTIZED_OPS
    int8_size = (banks["int8"] / ONNX_FILE).stat().st_size
    assert int8_size < 0.35 * (banks["fp32"] / ONNX_FILE).stat().st_size  # int8 weights: about a quarter


def test_fp32_bank_records_fp32_and_no_quantisation(banks):
    backbone = load_bank(banks["fp32"], FP32).meta.backbone
    assert (backbone.precision, backbone.quantization) == ("fp32", None)


def test_a_bank_saved_before_precision_existed_loads_as_fp32_with_its_id(banks, tmp_path):
    import shutil

    copy = shutil.copytree(banks["fp32"], tmp_path / "old")
    raw = json.loads((copy / META_FILE).read_text())
    del raw["backbone"]["precision"], raw["backbone"]["quantization"]
    (copy / META_FILE).write_text(json.dumps(raw))  # bank_id untouched: the old fields' defaults are left out of it
    bank = load_bank(copy, FP32)
    assert bank.meta.backbone.precision == "fp32"
    assert bank.meta.bank_id == load_bank(banks["fp32"], FP32).meta.bank_id


RECIPE_FIELDS = ("quantized_ops", "fp32_first_convs", "fp32_last_convs", "symmetric_activations", "flip_augment")


def _id_before_recipe_fields(tensors: dict[str, np.ndarray], raw: dict) -> str:
    """The bank_id as EAGLE computed it before meta.json recorded the recipe knobs (written out, not imported)."""
    described = {key: value for key, value in raw.items() if key not in ("bank_id", "created_utc")}
    for group, key, default in (("threshold", "search", "leave_own_out"), ("", "mask", None), ("", "embeddings", None)):
        holder = described[group] if group else described
        if holder.get(key, default) == default:
            holder.pop(key, None)
    return hash_bank(tensors, described)


def test_an_int8_bank_saved_before_the_recipe_fields_keeps_its_id_and_reads_as_the_plain_recipe(banks, tmp_path):
    import shutil

    copy = shutil.copytree(banks["int8"], tmp_path / "old-int8")
    raw = json.loads((copy / META_FILE).read_text())
    for name in RECIPE_FIELDS:  # those banks were quantised with onnxruntime's plain recipe: every operator, none kept
        del raw["backbone"]["quantization"][name]
    raw["bank_id"] = _id_before_recipe_fields(load_file(str(copy / TENSORS_FILE)), json.loads(json.dumps(raw)))
    (copy / META_FILE).write_text(json.dumps(raw))
    old = load_bank(copy, INT8).meta  # load_bank recomputes the id: a mismatch would be refused
    assert old.bank_id == raw["bank_id"]
    assert (old.backbone.quantization.quantized_ops, old.backbone.quantization.fp32_last_convs) == ("all", 0)
    # where they differ from the plain recipe the fields are part of the id: recording conv/2 changed it
    assert load_bank(banks["int8"], INT8).meta.bank_id != old.bank_id


# ------------------------------------------------------------------------------------------- accuracy
def test_int8_bank_flags_the_synthetic_defects(scored):
    labels = [kind != "good" for kind, *_ in scored]
    int8_scores = [r8.score for *_, r8 in scored]
    assert roc_auc_score(labels, int8_scores) >= 0.9
    flagged = [r8.anomalous for kind, _, _, r8 in scored if kind != "good"]
    assert sum(flagged) / len(flagged) >= 0.9


def test_int8_agrees_with_fp32_on_auroc_verdicts_and_scores(scored):
    labels = [kind != "good" for kind, *_ in scored]
    auroc32 = roc_auc_score(labels, [r32.score for _, _, r32, _ in scored])
    auroc8 = roc_auc_score(labels, [r8.score for *_, r8 in scored])
    assert abs(auroc32 - auroc8) <= 0.02
    differ = sum(r32.anomalous != r8.anomalous for _, _, r32, r8 in scored)
    assert differ <= 1, f"{differ} of {len(scored)} verdicts differ"
    # Near τ is where a verdict can flip: on the normal images, the scores relative to each bank's own τ agree.
    normal = [abs(r32.score / r32.tau - r8.score / r8.tau) for kind, _, r32, r8 in scored if kind == "good"]
    assert float(np.mean(normal)) < 0.15
    # Far above τ the int8 graph saturates (activations beyond the calibrated normal range are clipped): a defect
    # scores lower than in fp32, but still many times τ.
    assert min(r8.score / r8.tau for kind, _, _, r8 in scored if kind != "good") > 3.0


def test_int8_boxes_overlap_the_defects_like_fp32(scored, synthetic_root):
    truth_iou = {"fp32": [], "int8": []}
    between = []
    for kind, path, r32, r8 in scored:
        if kind == "good":
            continue
        assert r8.boxes and r32.boxes
        truth = _mask_bbox(synthetic_root / "widget" / "ground_truth" / kind / f"{path.stem}_mask.png")
        truth_iou["fp32"].append(_iou(_box(r32.boxes[0]), truth))
        truth_iou["int8"].append(_iou(_box(r8.boxes[0]), truth))
        between.append(_iou(_box(r32.boxes[0]), _box(r8.boxes[0])))
    medians = {k: float(np.median(v)) for k, v in truth_iou.items()}
    assert medians["int8"] >= medians["fp32"] - 0.1, medians
    assert float(np.median(between)) >= 0.5, between


def _box(box) -> tuple[int, int, int, int]:
    return int(box.x0), int(box.y0), int(box.x1), int(box.y1)


# ------------------------------------------------------------------------------------------- mismatch
def test_an_int8_bank_inspected_with_fp32_is_refused_with_a_clear_message(banks):
    with pytest.raises(BankError) as err:
        load_expert(banks["int8"], FP32)
    message = str(err.value)
    assert "setting precision: bank 'int8', running 'fp32'" in message
    assert "EAGLE_EXPERT__PRECISION=int8" in message


def test_an_fp32_bank_inspected_with_int8_is_refused(banks):
    with pytest.raises(BankError, match="setting precision: bank 'fp32', running 'int8'"):
        load_expert(banks["fp32"], INT8)


def test_int8_with_the_torch_runtime_is_refused_at_start_up(monkeypatch):
    with pytest.raises(ValidationError, match="precision 'int8' runs the bank's quantised ONNX graph"):
        ExpertSettings(precision="int8", runtime="torch")
    monkeypatch.setenv("EAGLE_EXPERT__PRECISION", "int8")
    monkeypatch.setenv("EAGLE_EXPERT__RUNTIME", "torch")
    with pytest.raises(ValidationError, match="EAGLE_EXPERT__RUNTIME=onnx"):
        Settings()


def test_the_torch_runtime_cannot_score_an_int8_bank(banks):
    bank = load_bank(banks["int8"], INT8)
    with pytest.raises(BankError, match="torch runtime cannot run"):
        make_embedder(bank, INT8, runtime="torch")


def test_a_bank_whose_graph_does_not_match_its_recorded_precision_is_refused(banks, tmp_path):
    import shutil

    fp32_graph = (banks["fp32"] / ONNX_FILE).read_bytes()
    copy = shutil.copytree(banks["int8"], tmp_path / "forged")
    tamper(copy, onnx_bytes=fp32_graph)
    with pytest.raises(BankError, match="an fp32 graph, but meta.json backbone.precision says 'int8'"):
        load_bank(copy, INT8)
    with pytest.raises(BankError, match="a quantised"):
        _check_onnx(banks["int8"] / ONNX_FILE, crop=224, patches=784, dim=1024, precision="fp32")


# ------------------------------------------------------------------------------------------- cache
def test_the_int8_graph_is_cached_per_reference_set(
    banks, references, random_backbone, random_weights_info, cache, quantise_calls, tmp_path
):
    images, names = references
    # The module's int8 build quantised, unless another xdist worker sharing the run's ONNX cache did it first.
    assert quantise_calls[:1] in ([len(images)], [])
    before = list(quantise_calls)
    build_bank(
        images,
        names,
        settings=INT8,
        backbone=random_backbone,
        weights_info=random_weights_info,
        out_dir=tmp_path / "again",
        name="again",
        onnx_cache=cache,
    )
    assert quantise_calls == before  # same references: a cache hit
    assert (tmp_path / "again" / ONNX_FILE).read_bytes() == (banks["int8"] / ONNX_FILE).read_bytes()
    build_bank(  # one reference fewer (as after teaching, the calibration set changed): quantised again
        images[:-1],
        names[:-1],
        settings=INT8,
        backbone=random_backbone,
        weights_info=random_weights_info,
        out_dir=tmp_path / "taught",
        name="taught",
        onnx_cache=cache,
    )
    assert quantise_calls == [*before, len(images) - 1]


def test_quant_keys_differ_by_calibration_recipe_and_base_and_prune_keeps_derived(tmp_path):
    base = ExportKey.create("wrn", "sha256:00", crop=224)
    other_base = ExportKey.create("wrn", "sha256:11", crop=224)
    zeros = calibration_digest(np.zeros((2, 3, 8, 8), np.float32))
    keys = [
        QuantKey.create(base, zeros),
        QuantKey.create(base, calibration_digest(np.ones((2, 3, 8, 8), np.float32))),
        QuantKey.create(base, zeros, QuantRecipe(format="qoperator")),
        QuantKey.create(base, zeros, QuantRecipe(per_channel=False)),
        QuantKey.create(other_base, zeros),
    ]
    assert len({k.digest() for k in keys}) == len(keys)
    cache = OnnxCache(tmp_path)
    for key in (base, other_base):
        cache.get_derived(key, lambda path: path.write_bytes(b"fp32"))
    for key in keys:
        cache.get_derived(key, lambda path: path.write_bytes(b"int8"))
    removed = {p.stem for p in cache.prune(base)}
    assert removed == {other_base.digest(), keys[-1].digest()}
    assert cache.lookup(keys[0]) is not None


def test_calibration_uses_at_most_the_limit_evenly_spaced():
    assert calibration_indices(100, 32)[:3] == [0, 3, 6]
    assert len(calibration_indices(100, 32)) == 32
    assert calibration_indices(100, 32)[-1] == 99


# ------------------------------------------------------------------------------------------- batch
def test_score_many_gives_the_results_of_score_one_by_one(banks, synthetic_root):
    scorer = load_expert(banks["int8"], INT8)
    paths = list_images(synthetic_root / "widget" / "test")[:5]
    images = [_read(p) for p in paths]
    single = [scorer.score(image) for image in images]
    batched = scorer.score_many(images, batch_size=3)
    assert len(batched) == len(images)
    for one, many in zip(single, batched, strict=True):
        assert many.anomalous == one.anomalous
        assert many.score == pytest.approx(one.score, rel=1e-3)
        assert many.template_index == one.template_index
        assert [b.peak for b in many.boxes] == pytest.approx([b.peak for b in one.boxes], rel=1e-2, abs=1e-6)
        assert set(many.timings_ms) == set(one.timings_ms)


def test_score_many_refuses_unbounded_or_empty_batches(banks):
    scorer = load_expert(banks["fp32"], FP32)
    image = np.zeros((64, 64, 3), np.uint8)
    for bad in (0, MAX_SCORE_BATCH + 1):
        with pytest.raises(ValueError, match="batch_size must be in"):
            scorer.score_many([image], batch_size=bad)
    with pytest.raises(ValueError, match="original sizes"):
        scorer.score_many([image], original_sizes=[None, None])
    assert scorer.score_many([]) == []


def test_recipe_knobs_exclude_convs_and_mirror_calibration(tmp_path: Path) -> None:
    """fp32_first/last_convs name the graph's first and last Conv nodes; flip_augment doubles the calibration."""
    from onnx import TensorProto, helper

    from expert.preprocess import Normalization
    from expert.quantize import QuantRecipe, calibration_tensors, fp32_nodes

    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 1, 1], [0.0] * 9)
    nodes = [helper.make_node("Conv", ["x" if i == 0 else f"y{i - 1}", "w"], [f"y{i}"], name=f"c{i}") for i in range(4)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y3", TensorProto.FLOAT, [1, 3, 4, 4])],
        [weight],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert fp32_nodes(path, QuantRecipe()) == []
    assert fp32_nodes(path, QuantRecipe(fp32_first_convs=1, fp32_last_convs=2)) == ["c0", "c2", "c3"]

    images = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    norm = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    plain = calibration_tensors(images, resize=32, crop=32, center_crop=True, normalization=norm)
    mirrored = calibration_tensors(images, resize=32, crop=32, center_crop=True, normalization=norm, flip_augment=True)
    assert plain.shape == (3, 3, 32, 32) and mirrored.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(mirrored[3:], plain[..., ::-1])


@pytest.mark.parametrize(("ops", "add_quantized"), [("all", True), ("conv", False)])
def test_quantized_ops_conv_leaves_the_residual_sum_in_float(tmp_path: Path, ops: str, add_quantized: bool) -> None:
    """``quantized_ops="conv"``: Conv nodes get int8 weights, while the residual sum stays a float tensor."""
    from onnx import TensorProto, helper

    from expert.embedder import ONNX_INPUT_NAME
    from expert.quantize import QuantRecipe, quantize_graph

    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 1, 1], rng.standard_normal(9).astype(np.float32))
    nodes = [
        helper.make_node("Conv", [ONNX_INPUT_NAME, "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", ONNX_INPUT_NAME], ["y"], name="residual"),
    ]
    shape = [1, 3, 8, 8]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(ONNX_INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [weight],
    )
    source, target = tmp_path / "g.onnx", tmp_path / "g-int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(source))
    calibration = rng.standard_normal((4, *shape[1:])).astype(np.float32)
    quantize_graph(source, target, calibration, QuantRecipe(quantized_ops=ops))  # type: ignore[arg-type]
    model = onnx.load(str(target))
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    add = next(node for node in model.graph.node if node.op_type == "Add")
    consumers = [node.op_type for node in model.graph.node if add.output[0] in node.input]
    assert ("QuantizeLinear" in consumers) is add_quantized  # "all" re-quantises the sum, "conv" keeps it float
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert producers.get(conv.input[1]) == "DequantizeLinear"  # the weights are int8 either way
