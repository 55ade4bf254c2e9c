"""Inspection masks: patches outside never count for the score, the boxes or DBT's τ; bank format 2.

A cheap deterministic embedder (8×8 mean colour per patch, projected to 1024 values) stands in for the backbone, so
every bank here is built in well under a second and its τ can be recomputed by brute force in numpy.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from eagle.settings import ExpertSettings
from expert.bank import load_bank, save_bank
from expert.bank_schema import MASK_TENSOR, BankError, BankMeta, compute_bank_id
from expert.build import fit_bank
from expert.dbt import compute_threshold
from expert.mask import (
    MAX_POLYGON_POINTS,
    MaskError,
    check_grid_mask,
    crop_mask,
    grid_mask_from_source,
    parse_polygons,
    read_mask_png,
    to_grid,
)
from expert.preprocess import preprocess
from expert.scorer import ExpertScorer
from tests.bank_tamper import hash_bank
from tests.synthetic import noisy_part, part_with_red_square

SETTINGS = ExpertSettings(weights="random", min_references=2, recommended_references=2)
SIZE = 224
GRID = (28, 28)
WEIGHTS = SimpleNamespace(source="random:seed=0", checksum="sha256:" + "ab" * 32)
RIGHT_HALF = {"width": SIZE, "height": SIZE, "polygons": [[[112, 0], [223, 0], [223, 223], [112, 223]]]}
OUTSIDE_DEFECT = (40, 90, 80, 130)  # x0, y0, x1, y1: left half, inside the centre crop
INSIDE_DEFECT = (150, 90, 190, 130)  # right half


class PooledEmbedder:
    """[B, 3, 224, 224] → [B, 784, 1024]: the mean colour of each 8×8 cell through a fixed random projection."""

    def __init__(self) -> None:
        self.projection = np.random.default_rng(7).standard_normal((3, 1024)).astype(np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        b = batch.shape[0]
        cells = batch.reshape(b, 3, 28, 8, 28, 8).mean(axis=(3, 5))  # [B, 3, 28, 28]
        return np.ascontiguousarray(cells.transpose(0, 2, 3, 1).reshape(b, 784, 3) @ self.projection)


EMBEDDER = PooledEmbedder()


def _normal(seed: int) -> np.ndarray:
    return noisy_part(seed, SIZE)


def _with_defect(box: tuple[int, int, int, int]) -> np.ndarray:
    """A red square on the first reference image (whose patches the bank knows: it scores below s_max without it)."""
    return part_with_red_square(box, SIZE)


NORMALS = [_normal(i) for i in range(8)]
NAMES = [f"n{i}.png" for i in range(8)]


def _mask() -> np.ndarray:
    grid, _ = grid_mask_from_source(RIGHT_HALF, resize=256, crop=224, center_crop=True, grid=GRID)
    return grid


def _save(tmp_path, name: str, mask: np.ndarray | None):
    bank = fit_bank(
        NORMALS, NAMES, settings=SETTINGS, backbone=None, weights_info=WEIGHTS, name=name, embedder=EMBEDDER, mask=mask
    )
    save_bank(bank, tmp_path / name, reference_images=NORMALS)
    return load_bank(tmp_path / name, SETTINGS)


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask-banks")
    return {"masked": _save(root, "masked", _mask()), "plain": _save(root, "plain", None)}


def _score(bank, image):
    return ExpertScorer(bank, EMBEDDER, SETTINGS).score(image)


# ------------------------------------------------------------------------------------------- geometry


def test_right_half_polygon_maps_to_the_right_half_of_the_grid():
    mask = _mask()
    assert mask.shape == GRID and mask.dtype == bool
    # centre crop of a 224 image: resized to 256, offset 16 — patch c is centred at original x = (8c + 16.5)·224/256
    xs = [(8 * c + 16 + 0.5) * SIZE / 256 - 0.5 for c in range(28)]
    expected = np.array([np.floor(x + 0.5) >= 112 for x in xs])
    assert (mask == expected[None, :]).all()


def test_png_and_polygons_give_the_same_grid(tmp_path):
    pixels = np.zeros((SIZE, SIZE), np.uint8)
    pixels[:, 112:] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    from_png, description = grid_mask_from_source(path, resize=256, crop=224, center_crop=True, grid=GRID)
    assert (from_png == _mask()).all() and description == "png:mask.png 224x224"
    json_path = tmp_path / "mask.json"
    json_path.write_text(json.dumps(RIGHT_HALF))
    from_json, _ = grid_mask_from_source(json_path, resize=256, crop=224, center_crop=True, grid=GRID)
    assert (from_json == from_png).all()


def test_transparent_drawing_layer_counts_painted_pixels_only():
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[:, 112:] = (255, 255, 255, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    inside = read_mask_png(buffer.getvalue())
    assert inside[:, 112:].all() and not inside[:, :112].any()


def test_crop_mask_follows_patch_centres():
    grid = np.zeros(GRID, bool)
    grid[:, 14:] = True
    full = crop_mask(grid, (224, 224))
    assert not full[:, : 8 * 14 - 4].any() and full[:, 8 * 14 - 4 :].all()


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_grid_mask(np.ones((27, 28), bool), GRID), r"shape \(27, 28\) differs from the patch grid"),
        (lambda: check_grid_mask(np.zeros(GRID, bool), GRID), "the mask is empty"),
        (lambda: check_grid_mask(np.full(GRID, 2, np.uint8), GRID), "values must be 0 or 1"),
        (lambda: read_mask_png(b"not a png"), "not a readable image"),
        (lambda: read_mask_png(_png(np.zeros((10, 10), np.uint8))), "the mask is empty"),
        (lambda: parse_polygons("{"), "not valid JSON"),
        (lambda: parse_polygons({"polygons": [[[0, 0], [1, 1]]]}, default_size=(5, 5)), "at least 3"),
        (lambda: parse_polygons({"polygons": [[[0, 0], [1, 1], [0, 1]]]}), "width and height are required"),
        (lambda: parse_polygons({"width": 5, "polygons": [[[0, 0], [1, 1], [0, 1]]]}), "both width and height"),
        (lambda: parse_polygons({"polygons": [[[0, 0], [1, "x"], [0, 1]]]}, default_size=(5, 5)), "not \\[x, y\\]"),
        (lambda: parse_polygons({"polygons": [], "width": 5, "height": 5}), "non-empty list"),
        (lambda: parse_polygons({"polygons": [[[0, 0]] * 3], "width": 5, "height": 5, "x": 1}), "1 unknown key"),
    ],
)
def test_mask_validation_errors(call, message):
    with pytest.raises(MaskError, match=message):
        call()


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_zero_byte_mask_says_the_file_is_empty(tmp_path):
    with pytest.raises(MaskError) as caught:
        read_mask_png(b"")
    assert str(caught.value) == (
        "mask: the mask file is empty (0 bytes); expected a PNG, white = inspected, black = ignored"
    )
    (tmp_path / "zone.png").write_bytes(b"")
    (tmp_path / "zone.json").write_bytes(b"")
    with pytest.raises(MaskError, match=r"^zone\.png: the mask file is empty \(0 bytes\)"):
        grid_mask_from_source(tmp_path / "zone.png", resize=256, crop=224, center_crop=True, grid=GRID)
    with pytest.raises(MaskError) as caught:
        grid_mask_from_source(tmp_path / "zone.json", resize=256, crop=224, center_crop=True, grid=GRID)
    assert str(caught.value) == "mask polygons: the polygons JSON is empty"


NOISE_PNG = _png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))


@pytest.mark.parametrize(
    "data",
    [b"not a png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, NOISE_PNG[: len(NOISE_PNG) // 2]],
    ids=["text", "png-signature-only", "truncated-png"],
)
def test_an_unreadable_mask_is_described_without_python_objects(data):
    with pytest.raises(MaskError) as caught:
        read_mask_png(data, name="zone.png")
    message = str(caught.value)
    assert message.startswith("zone.png: not a readable image (")
    assert "<" not in message and "object at" not in message and "BytesIO" not in message


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"polygons": [[[0, 0], [1, "root:SECRET-CANARY-123"], [0, 1]]]},
            "mask polygons: polygon 0, point 1 is not [x, y] finite numbers (got [a number, a string])",
        ),
        (
            {"polygons": [[[0, 0], [1, 1], [0, 1], ["SECRET-CANARY-123"]]]},
            "mask polygons: polygon 0, point 3 is not [x, y] finite numbers (got a list of 1 item)",
        ),
        (
            {"polygons": [[[0, 0]] * 3], "width": 5, "height": 5, "SECRET-CANARY-123": 1, "x": 2},
            "mask polygons: 2 unknown keys; the accepted keys are width, height and polygons",
        ),
        (
            {"polygons": [[[0, 0]] * 3], "width": "SECRET-CANARY-123", "height": 2.5},
            "mask polygons: width and height must be positive integers (got a string, a fractional number)",
        ),
    ],
    ids=["point", "short-point", "unknown-keys", "size"],
)
def test_polygon_errors_say_the_kind_and_position_never_the_value(spec, message):
    with pytest.raises(MaskError) as caught:
        parse_polygons(spec, default_size=(5, 5))
    assert str(caught.value) == message and "SECRET" not in message


def test_a_million_point_polygon_gets_the_point_limit():
    ring = [[float(i % 1000), float(i // 1000)] for i in range(1_000_000)]
    with pytest.raises(MaskError) as caught:
        parse_polygons({"width": 1000, "height": 1000, "polygons": [ring]})
    assert str(caught.value) == (
        "mask polygons: 1,000,000 points, more than the 100,000 accepted; simplify the outline (a few hundred "
        "points draw any region at patch precision) or send the mask as a PNG"
    )
    polygons, _ = parse_polygons({"width": 1000, "height": 1000, "polygons": [ring[:MAX_POLYGON_POINTS]]})
    assert len(polygons[0]) == MAX_POLYGON_POINTS  # the limit itself is accepted


def test_a_black_and_white_png_is_described_plainly(caplog):
    pixels = np.zeros((SIZE, SIZE), np.uint8)
    pixels[:, 112:] = 255
    grid, description = grid_mask_from_source(_png(pixels), resize=256, crop=224, center_crop=True, grid=GRID)
    assert (grid == _mask()).all() and description == "png:mask 224x224" and "black-and-white" not in caplog.text


def test_a_grey_level_png_is_read_at_128_and_says_so(caplog):
    pixels = np.full((SIZE, SIZE), 127, np.uint8)  # just dark: ignored
    pixels[:, 112:] = 128  # just bright: inspected
    with caplog.at_level("WARNING", logger="expert.mask"):
        grid, description = grid_mask_from_source(_png(pixels), resize=256, crop=224, center_crop=True, grid=GRID)
    assert (grid == _mask()).all()
    note = (
        "not black-and-white: 100 % of its pixels are grey, coloured or half-transparent; read as inspected where "
        "luminance >= 128 and, in a PNG with transparency, alpha >= 128"
    )
    assert description == f"png:mask 224x224; {note}"
    assert f"inspection mask png:mask 224x224 is {note}" in caplog.text


def test_anti_aliased_edges_and_half_transparent_strokes_are_reported_by_share():
    pixels = np.zeros((100, 100), np.uint8)
    pixels[:, 50:] = 255
    pixels[:, 50] = 180  # an anti-aliased edge: 1 % of the pixels
    _, description = grid_mask_from_source(_png(pixels), resize=100, crop=100, center_crop=True, grid=(10, 10))
    assert description.startswith("png:mask 100x100; not black-and-white: 1 % of its pixels are grey")
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[:, 50:] = (255, 255, 255, 255)
    rgba[:, :25] = (255, 255, 255, 100)  # a half-transparent white stroke: alpha < 128, not inspected
    rgba[:, 25:50] = (90, 10, 200, 0)  # fully transparent: its colour does not matter
    grid, description = grid_mask_from_source(_png(rgba), resize=100, crop=100, center_crop=True, grid=(10, 10))
    assert description.startswith("png:mask 100x100; not black-and-white: 25 % of its pixels")
    assert grid[:, 5:].all() and not grid[:, :5].any()


def test_a_mask_only_on_the_uninspected_border_is_refused():
    pixels = np.zeros((SIZE, SIZE), bool)
    pixels[:, :10] = True  # the centre crop never sees the first ~14 original columns
    with pytest.raises(MaskError, match="covers no patch centre"):
        to_grid(pixels, resize=256, crop=224, center_crop=True, grid=GRID)


def test_build_refuses_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match="differs from the patch grid"):
        fit_bank(
            NORMALS,
            NAMES,
            settings=SETTINGS,
            backbone=None,
            weights_info=WEIGHTS,
            name="x",
            embedder=EMBEDDER,
            mask=np.ones((14, 14), bool),
        )


def _edit_tensors(bank_dir, edit) -> None:
    path = bank_dir / "bank.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"eagle_bank_format": "2"})


def _rewrite_meta(bank_dir, edit, *, reid: bool = True) -> None:
    path = bank_dir / "meta.json"
    raw = json.loads(path.read_text())
    edit(raw)
    if reid:
        tensors = load_file(str(bank_dir / "bank.safetensors"))
        raw["bank_id"] = compute_bank_id(tensors, BankMeta.model_validate(raw))
    path.write_text(json.dumps(raw))


def _reid(bank_dir) -> None:
    _rewrite_meta(bank_dir, lambda raw: None)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({MASK_TENSOR: np.ones((14, 14), np.uint8)}), r"shape \(14, 14\), the patch grid"),
        (lambda t: t.update({MASK_TENSOR: np.full(GRID, 2, np.uint8)}), "values must be 0 or 1"),
        (lambda t: t.update({MASK_TENSOR: np.zeros(GRID, np.uint8)}), "is empty"),
        (lambda t: t.update({MASK_TENSOR: np.ones(GRID, np.float32)}), "dtype float32, expected uint8"),
        (lambda t: t.update({MASK_TENSOR: np.ones(GRID, np.uint8)}), "mask.patches says"),
        (lambda t: t.pop(MASK_TENSOR), "inspection_mask is missing"),
    ],
)
def test_a_tampered_mask_is_refused_on_load(tmp_path, banks, edit, message):
    import shutil

    bank_dir = tmp_path / "copy"
    shutil.copytree(banks["masked"].directory, bank_dir)
    _edit_tensors(bank_dir, edit)
    _reid(bank_dir)  # even with a recomputed bank_id
    with pytest.raises(BankError, match=message):
        load_bank(bank_dir)


def test_a_mask_tensor_without_meta_is_refused(tmp_path, banks):
    import shutil

    bank_dir = tmp_path / "copy"
    shutil.copytree(banks["plain"].directory, bank_dir)
    _edit_tensors(bank_dir, lambda t: t.update({MASK_TENSOR: np.ones(GRID, np.uint8)}))
    _reid(bank_dir)
    with pytest.raises(BankError, match="present but meta.json has no mask"):
        load_bank(bank_dir)


# ------------------------------------------------------------------------------------------- format


def _format1_bank_id(tensors: dict[str, np.ndarray], raw: dict) -> str:
    """The bank id exactly as format-1 EAGLE computed it (its later-field rule included)."""
    described = {k: v for k, v in raw.items() if k not in ("bank_id", "created_utc")}
    described["threshold"] = dict(described["threshold"])
    if described["threshold"].get("search", "leave_own_out") == "leave_own_out":
        described["threshold"].pop("search", None)
    if described.get("reference_max_side") is None:
        described.pop("reference_max_side", None)
    return hash_bank(tensors, described)


def test_a_format_1_bank_still_loads_with_its_id(tmp_path, banks):
    import shutil

    bank_dir = tmp_path / "old"
    shutil.copytree(banks["plain"].directory, bank_dir)
    raw = json.loads((bank_dir / "meta.json").read_text())
    assert raw["format_version"] == 2 and raw["mask"] is None
    raw["format_version"] = 1
    del raw["mask"]
    raw.pop("embeddings")  # added after format 1 too
    for later in ("precision", "quantization"):  # backbone fields added after format 1 (fp32 banks leave them out)
        raw["backbone"].pop(later)
    tensors = load_file(str(bank_dir / "bank.safetensors"))
    save_file(tensors, str(bank_dir / "bank.safetensors"), metadata={"eagle_bank_format": "1"})
    raw["bank_id"] = _format1_bank_id(tensors, raw)
    (bank_dir / "meta.json").write_text(json.dumps(raw))
    old = load_bank(bank_dir, SETTINGS)
    assert old.meta.format_version == 1 and old.mask is None and old.meta.bank_id == raw["bank_id"]
    assert _score(old, _with_defect(OUTSIDE_DEFECT)).anomalous  # no mask: every patch counts
    # format 1 cannot carry a mask
    _rewrite_meta(bank_dir, lambda r: r.update(mask={"patches": 392}), reid=False)
    _edit_tensors(bank_dir, lambda t: t.update({MASK_TENSOR: _mask().astype(np.uint8)}))
    with pytest.raises(BankError, match="format_version 1 banks carry no inspection mask"):
        load_bank(bank_dir)


def test_the_mask_is_in_the_bank_format_and_id(banks):
    masked, plain = banks["masked"], banks["plain"]
    assert masked.meta.format_version == 2 and masked.meta.mask is not None
    assert masked.meta.mask.patches == int(_mask().sum()) and masked.meta.mask.rule == "patch_centre"
    assert (masked.mask == _mask()).all()
    tensors = load_file(str(masked.directory / "bank.safetensors"))
    assert tensors[MASK_TENSOR].dtype == np.uint8 and tensors[MASK_TENSOR].shape == GRID
    # the id covers the mask: another mask with the same tensors and meta otherwise gives another id
    other = dict(tensors)
    flipped = tensors[MASK_TENSOR].copy()
    flipped[0, 27] = 0
    other[MASK_TENSOR] = flipped
    meta = masked.meta.model_copy(deep=True)
    meta.mask.patches -= 1
    assert compute_bank_id(other, meta) != compute_bank_id(tensors, masked.meta) == masked.meta.bank_id
    assert masked.meta.bank_id != plain.meta.bank_id


# ------------------------------------------------------------------------------------------- behaviour


def test_a_defect_outside_the_mask_does_not_flag(banks):
    assert not _score(banks["masked"], _normal(0)).anomalous
    image = _with_defect(OUTSIDE_DEFECT)
    assert _score(banks["plain"], image).anomalous  # the defect is real: without a mask it flags
    result = _score(banks["masked"], image)
    assert not result.anomalous and result.boxes == []
    assert result.score < banks["masked"].tau
    assert float(result.patch_scores[~_mask()].max()) == 0.0


def test_a_defect_inside_the_mask_flags_and_is_boxed_inside(banks):
    result = _score(banks["masked"], _with_defect(INSIDE_DEFECT))
    assert result.anomalous and result.boxes
    box = result.boxes[0]
    assert box.x0 >= 112 - 8 and box.x0 <= INSIDE_DEFECT[2] and box.x1 >= INSIDE_DEFECT[0]
    # the heatmap's valid region is the mask: the left half reads as not inspected (greyed)
    values, valid = result.map_at(SIZE, SIZE)
    assert not valid[:, :100].any() and valid[100:120, 130:200].all() and float(values[:, :100].max()) == 0.0


def test_both_defects_box_only_the_inside_one(banks):
    image = _with_defect(OUTSIDE_DEFECT)
    x0, y0, x1, y1 = INSIDE_DEFECT
    image[y0:y1, x0:x1] = (255, 0, 0)
    result = _score(banks["masked"], image)
    assert result.anomalous and all(box.x1 > 112 - 8 for box in result.boxes)


def _brute_force_tau(bank) -> tuple[float, np.ndarray]:
    """τ from scratch: leave-own-out DBT over the patches inside the mask, plain numpy, no faiss, no pruning."""
    mask = bank.mask.reshape(-1)
    features = np.stack([EMBEDDER(preprocess(image)[0][None])[0] for image in NORMALS])[:, mask]  # [N, Pm, D]
    memory, owners = bank.memory_bank.astype(np.float64), bank.coreset_image_ids
    scores = []
    for i, patches in enumerate(features):
        in_bank = (patches[:, None, :] == bank.memory_bank[None, owners == i, :]).all(axis=2).any(axis=1)
        unsampled = patches[~in_bank].astype(np.float64)
        if len(unsampled) < SETTINGS.min_unsampled_patches:
            continue
        others = memory[owners != i]
        d2 = ((unsampled[:, None, :] - others[None, :, :]) ** 2).sum(axis=2)
        scores.append(d2.min(axis=1).max())
    return compute_threshold(np.array(scores), "k_sigma", kappa=SETTINGS.kappa).tau, np.array(scores)


def test_tau_equals_a_brute_force_recomputation_with_the_same_mask(banks):
    bank = banks["masked"]
    mask = bank.mask.reshape(-1)
    inside = np.stack([EMBEDDER(preprocess(image)[0][None])[0] for image in NORMALS])[:, mask].reshape(-1, 1024)
    # every memory-bank row is a patch from inside the mask
    assert all((inside == row).all(axis=1).any() for row in bank.memory_bank)
    tau, scores = _brute_force_tau(bank)
    # faiss computes squared distances in float32 expanded form (|a|² + |b|² - 2ab): agreement to ~1e-4 relative
    assert np.allclose(scores, bank.train_scores, rtol=1e-3)
    assert tau == pytest.approx(bank.tau, rel=1e-3)
    assert bank.tau != pytest.approx(banks["plain"].tau, rel=1e-3)


# ------------------------------------------------------------------------------------------- app input


def test_a_drawing_in_the_app_becomes_the_painted_pixel_mask(tmp_path):
    from app.handlers import mask_from_inputs

    background = np.zeros((SIZE, SIZE, 4), np.uint8)
    stroke = np.zeros((SIZE, SIZE, 4), np.uint8)
    stroke[:, 112:] = (255, 0, 255, 255)  # painted right half
    drawing = {"background": background, "layers": [stroke], "composite": stroke}
    pixels = mask_from_inputs(None, drawing)
    assert pixels.shape == (SIZE, SIZE) and pixels[:, 112:].all() and not pixels[:, :112].any()
    grid, description = grid_mask_from_source(pixels, resize=256, crop=224, center_crop=True, grid=GRID)
    assert (grid == _mask()).all() and description == "array:mask 224x224"
    # nothing painted: no mask; an uploaded file wins over the drawing
    assert mask_from_inputs(None, {"background": background, "layers": [np.zeros_like(stroke)]}) is None
    assert mask_from_inputs(None, None) is None
    assert mask_from_inputs(str(tmp_path / "m.png"), drawing) == tmp_path / "m.png"
