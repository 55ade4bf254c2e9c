"""The expert normalises with the backbone's own statistics, records them, and refuses a bank built with others.

The default WideResNet-50-2 keeps ImageNet's statistics bit for bit; a second backbone with Inception-style
statistics (mean = std = 0.5, a tiny timm MobileNetV3 with random weights) proves the values follow timm's
``pretrained_cfg``, reach the bank's meta.json, and are checked when the bank is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image
from pydantic import ValidationError

from expert.backbone import build_patch_embedder
from expert.bank import load_bank, save_bank
from expert.bank_schema import BankError
from expert.build import fit_bank
from expert.config import ExpertSettings
from expert.embedder import TorchEmbedder, embed_images
from expert.preprocess import (
    Normalization,
    NormalizationError,
    backbone_normalization,
    expert_normalization,
    preprocess,
)
from expert.scorer import ExpertScorer, load_expert
from expert.weights import load_backbone
from tests.bank_tamper import tamper
from tests.test_bank import _bank, onnx_file, saved  # noqa: F401 - fixtures: a small bank with ImageNet's statistics

SECOND = "tf_mobilenetv3_small_minimal_100.in1k"
"""A tiny timm backbone (0.4 M parameters, features at strides 8 and 16) trained with mean = std = 0.5."""
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 7 * i, 56, 3), dtype=np.uint8) for i in range(count)]


def _old_formula(image: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """What preprocessing computed before the statistics came from the backbone, ImageNet's written literally."""
    height, width = image.shape[:2]
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    array = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    top, left = int(round((size[1] - crop) / 2.0)), int(round((size[0] - crop) / 2.0))
    window = array[top : top + crop, left : left + crop]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    normalised = (window.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


# ------------------------------------------------------------------------------------------- the default


def test_the_default_backbone_keeps_imagenet_statistics_bit_for_bit():
    settings = ExpertSettings()
    normalization = expert_normalization(settings)
    assert (normalization.mean, normalization.std) == IMAGENET
    for image in [*_images(2), np.random.default_rng(3).integers(0, 256, (300, 200, 3), dtype=np.uint8)]:
        old = _old_formula(image)
        for tensor in (preprocess(image, normalization=normalization)[0], preprocess(image)[0]):
            assert tensor.dtype == np.float32 and tensor.shape == (3, 224, 224)
            assert np.array_equal(tensor, old)  # exact equality: same float32 values, same arithmetic order


def test_the_default_expert_feeds_its_network_exactly_what_it_fed_before(saved):  # noqa: F811
    """Both the build (embed_images) and the scorer (the bank's recorded values) give the old input bit for bit."""
    images = _images(3, seed=5)
    old = np.stack([_old_formula(image) for image in images])
    normalization = expert_normalization(ExpertSettings())
    built, _ = embed_images(lambda batch: batch, images, normalization=normalization)  # identity "embedder"
    assert built.dtype == np.float32 and np.array_equal(built, old)
    scorer = ExpertScorer(load_bank(saved), lambda batch: batch, ExpertSettings(weights="random"))
    assert np.array_equal(np.stack([scorer.patch_features(image)[0] for image in images]), old)


def test_the_statistics_follow_timms_pretrained_cfg():
    cfg = timm.get_pretrained_cfg(SECOND)
    second = backbone_normalization(SECOND)
    assert (second.mean, second.std) == (tuple(cfg.mean), tuple(cfg.std)) == ((0.5,) * 3, (0.5,) * 3)
    clip = backbone_normalization("resnet50_clip.openai")  # CLIP-style statistics, read without any download
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert expert_normalization(ExpertSettings(backbone=SECOND)) == second


def test_the_settings_override_the_backbone_each_half_on_its_own():
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    both = expert_normalization(ExpertSettings(normalize_mean=mean, normalize_std=std))
    assert (both.mean, both.std) == (mean, std)
    only_mean = expert_normalization(ExpertSettings(backbone=SECOND, normalize_mean=mean))
    assert (only_mean.mean, only_mean.std) == (mean, (0.5, 0.5, 0.5))
    only_std = expert_normalization(ExpertSettings(normalize_std=std))
    assert (only_std.mean, only_std.std) == (IMAGENET[0], std)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"normalize_std": (0.5, 0.0, 0.5)}, "every std must be > 0"),
        ({"normalize_std": (0.5, -1.0, 0.5)}, "every std must be > 0"),
        ({"normalize_mean": (0.5, 0.5)}, "normalize_mean"),
        ({"normalize_mean": (0.5, 0.5, 0.5, 0.5)}, "normalize_mean"),
        ({"normalize_mean": (float("nan"), 0.5, 0.5)}, "three finite numbers"),
    ],
)
def test_bad_overrides_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        ExpertSettings(**values)


def test_the_overrides_come_from_the_environment(monkeypatch):
    from eagle.settings import load_settings

    monkeypatch.setenv("EAGLE_EXPERT__NORMALIZE_MEAN", "[0.5, 0.5, 0.5]")
    monkeypatch.setenv("EAGLE_EXPERT__NORMALIZE_STD", "[0.25, 0.25, 0.25]")
    expert = load_settings().expert
    assert (expert.normalize_mean, expert.normalize_std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_a_backbone_without_statistics_names_the_settings_to_give():
    with pytest.raises(NormalizationError, match="EAGLE_EXPERT__NORMALIZE_MEAN and EAGLE_EXPERT__NORMALIZE_STD") as err:
        backbone_normalization("no_such_backbone_anywhere")
    from eagle.errors import as_eagle_error

    mapped = as_eagle_error(err.value)  # every front end: a configuration error, not an internal one
    assert mapped is not None and (mapped.code, mapped.http_status) == ("invalid_settings", 422)
    given = expert_normalization(
        ExpertSettings(backbone="no_such_backbone_anywhere", normalize_mean=(0.5,) * 3, normalize_std=(0.5,) * 3)
    )
    assert given.mean == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------ a second backbone


@pytest.fixture(scope="module")
def second_settings() -> ExpertSettings:
    return ExpertSettings(
        backbone=SECOND,
        weights="random",
        resize=64,
        crop=64,
        min_references=2,
        recommended_references=2,
        min_unsampled_patches=4,
        coreset_ratio=0.25,
    )


@pytest.fixture(scope="module")
def second_bank(second_settings, tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    module, info = load_backbone(second_settings)
    images = _images(4)
    bank = fit_bank(
        images,
        [f"{i}.png" for i in range(4)],
        settings=second_settings,
        backbone=module,
        weights_info=info,
        name="second",
    )
    directory = tmp_path_factory.mktemp("normalization") / "second"
    save_bank(bank, directory, reference_images=images, reference_max_side=64)
    return directory, images


def test_a_bank_records_and_scores_with_the_second_backbones_statistics(second_bank, second_settings):
    directory, images = second_bank
    bank = load_bank(directory, second_settings)
    assert (bank.meta.preprocessing.mean, bank.meta.preprocessing.std) == ((0.5,) * 3, (0.5,) * 3)
    scorer = load_expert(directory, second_settings, runtime="torch")
    assert (scorer.normalization.mean, scorer.normalization.std) == ((0.5,) * 3, (0.5,) * 3)
    # The scorer's network input is the image normalised with the backbone's statistics, not ImageNet's.
    module, _ = load_backbone(second_settings)
    embedder = TorchEmbedder(build_patch_embedder(module, input_size=64))
    half = Normalization(mean=(0.5,) * 3, std=(0.5,) * 3)
    query = images[1]
    expected = embedder(preprocess(query, resize=64, crop=64, normalization=half)[0][None])[0]
    imagenet = embedder(preprocess(query, resize=64, crop=64)[0][None])[0]
    features, _ = scorer.patch_features(query)
    np.testing.assert_array_equal(features, expected)
    assert not np.allclose(features, imagenet)
    result = scorer.score(query)
    assert np.isfinite(result.score) and result.patch_scores.shape == (8, 8)
    nearest = ((features[:, None, :] - bank.memory_bank[None]) ** 2).sum(-1).min(axis=1)  # those very features
    assert result.score == pytest.approx(float(nearest.max()), rel=1e-4)


def test_other_normalisation_than_the_banks_is_refused_with_both_values(second_bank, second_settings):
    directory, _ = second_bank
    imagenet = second_settings.model_copy(update={"normalize_mean": IMAGENET[0], "normalize_std": IMAGENET[1]})
    with pytest.raises(BankError) as err:
        load_bank(directory, imagenet)
    message = str(err.value)
    assert "\n" not in message
    assert "setting normalisation: bank mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5]" in message
    assert "running mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225]" in message
    assert "rebuild the bank" in message
    assert "EAGLE_EXPERT__NORMALIZE_MEAN='[0.5, 0.5, 0.5]'" in message
    with pytest.raises(BankError, match="setting normalisation"):
        load_expert(directory, second_settings.model_copy(update={"normalize_std": (0.25,) * 3}), runtime="torch")


def test_setting_the_banks_own_values_loads_it(second_bank, second_settings):
    directory, _ = second_bank
    same = second_settings.model_copy(update={"normalize_mean": (0.5,) * 3, "normalize_std": (0.5,) * 3})
    assert load_bank(directory, same).meta.preprocessing.mean == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------------------- existing banks


def test_a_bank_recorded_with_imagenet_statistics_loads_under_the_default(saved):  # noqa: F811
    bank = load_bank(saved, ExpertSettings(weights="random"))
    assert (bank.meta.preprocessing.mean, bank.meta.preprocessing.std) == IMAGENET


def test_a_default_backbone_bank_with_other_statistics_is_refused(saved):  # noqa: F811
    tamper(saved, meta=lambda raw: raw["preprocessing"].update(mean=[0.5] * 3, std=[0.5] * 3))
    load_bank(saved)  # consistent on its own
    with pytest.raises(BankError, match=r"bank mean \[0.5, 0.5, 0.5\].*running mean \[0.485, 0.456, 0.406\]"):
        load_bank(saved, ExpertSettings(weights="random"))


def test_a_bank_whose_std_is_not_positive_is_refused(saved):  # noqa: F811
    tamper(saved, meta=lambda raw: raw["preprocessing"].update(std=[0.5, 0.0, 0.5]))
    with pytest.raises(BankError, match=r"preprocessing.std \[0.5, 0.0, 0.5\] must be > 0"):
        load_bank(saved)


def test_another_backbone_is_refused_for_the_backbone_alone(saved):  # noqa: F811
    # Only the backbone: another backbone's statistics are not compared (the backbone alone settles it).
    message = rf"setting backbone: bank 'wide_resnet50_2.tv_in1k', running '{SECOND}' \(EAGLE_EXPERT__BACKBONE\)$"
    with pytest.raises(BankError, match=message):
        load_bank(saved, ExpertSettings(weights="random", backbone=SECOND))


def test_make_meta_records_what_the_settings_give():
    bank = _bank(settings=ExpertSettings(weights="random", normalize_std=(0.3, 0.3, 0.3)))
    assert (bank.meta.preprocessing.mean, bank.meta.preprocessing.std) == (IMAGENET[0], (0.3, 0.3, 0.3))
