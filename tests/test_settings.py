from pathlib import Path

import pytest

from eagle.settings import Settings, SettingsError, load_settings


def test_defaults_match_the_paper():
    s = Settings()
    assert s.expert.backbone == "wide_resnet50_2.tv_in1k"
    assert (s.expert.resize, s.expert.crop, s.expert.coreset_ratio) == (256, 224, 0.1)
    assert (s.expert.coreset_projection_dim, s.expert.coreset_starts) == (128, 10)
    assert s.expert.distance == "sqeuclidean" and s.expert.threshold_method == "k_sigma" and s.expert.kappa == 3.0
    assert s.expert.gaussian_sigma == 4.0
    assert (s.caas.alpha, s.caas.layer_start, s.caas.layer_end, s.caas.mode) == (0.6, 9, 15, "logit")
    assert s.mllm.preset == "qwen2.5-vl-7b"


def test_nested_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE_EXPERT__THRESHOLD_METHOD", "quantile")
    monkeypatch.setenv("EAGLE_CAAS__ALPHA", "0.25")
    monkeypatch.setenv("EAGLE_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.expert.threshold_method == "quantile"
    assert s.caas.alpha == 0.25
    assert s.data_dir == tmp_path
    assert s.banks_dir == tmp_path / "banks"


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("EAGLE_MLLM__ENABLED=false\nEAGLE_EXPERT__KAPPA=2.5\n")
    s = load_settings()
    assert s.mllm.enabled is False
    assert s.expert.kappa == 2.5


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("EAGLE_EXPERT__THRESHOLD_METHOD", "p99"),
        ("EAGLE_CAAS__ALPHA", "-1"),
        ("EAGLE_EXPERT__CORESET_RATOI", "0.2"),
        ("EAGLE_SERVICE__PORT", "99999"),
    ],
)
def test_bad_value_or_misspelt_key_names_the_key(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=key):
        load_settings()


def test_cross_field_validation():
    with pytest.raises(SettingsError, match="layer_end"):
        load_settings(caas={"layer_start": 10, "layer_end": 3})
    with pytest.raises(SettingsError, match="weights_path"):
        load_settings(expert={"weights": "file"})
