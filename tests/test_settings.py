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


def test_onnx_cache_folder_defaults_under_the_data_dir_and_can_be_moved(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("EAGLE_ONNX_CACHE_DIR", raising=False)
    s = load_settings()
    assert s.onnx_cache_dir is None and s.onnx_cache_path == tmp_path / "data" / "cache" / "onnx"
    monkeypatch.setenv("EAGLE_ONNX_CACHE_DIR", "")  # empty: unset
    assert load_settings().onnx_cache_path == tmp_path / "data" / "cache" / "onnx"
    monkeypatch.setenv("EAGLE_ONNX_CACHE_DIR", str(tmp_path / "shared"))
    s = load_settings()
    assert s.onnx_cache_dir == s.onnx_cache_path == tmp_path / "shared" and s.banks_dir == tmp_path / "data" / "banks"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EAGLE_ONNX_CACHE_DIR", "~/onnx")
    assert load_settings().onnx_cache_path == tmp_path / "home" / "onnx"


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


# -- each package owns its configuration; eagle.settings composes it -----------------------------
def test_the_root_composes_the_packages_own_models(monkeypatch):
    from expert.config import ExpertSettings
    from mllm.config import CAASSettings, MLLMSettings, PromptSettings

    monkeypatch.setenv("EAGLE_PROMPT__SETTING", "visual")
    monkeypatch.setenv("EAGLE_MLLM__PRESET", "qwen2.5-vl-3b")
    s = load_settings()
    assert type(s.expert) is ExpertSettings and type(s.mllm) is MLLMSettings
    assert type(s.caas) is CAASSettings and type(s.prompt) is PromptSettings
    assert (s.prompt.setting, s.mllm.preset) == ("visual", "qwen2.5-vl-3b")


def test_the_package_models_are_usable_without_the_root():
    from expert.config import ExpertSettings
    from mllm.config import CAASSettings

    assert ExpertSettings(kappa=2.0).kappa == 2.0
    with pytest.raises(ValueError, match="layer_end"):
        CAASSettings(layer_start=5, layer_end=4)
    with pytest.raises(ValueError, match="extra"):
        ExpertSettings(kapa=2.0)


def test_prompt_settings_are_one_vocabulary():
    from typing import get_args

    from eagle.records import InspectionResult, InspectOptions
    from mllm import prompts
    from mllm.config import PROMPT_SETTINGS, PromptSetting, PromptSettings

    assert PROMPT_SETTINGS == get_args(PromptSetting) == ("baseline", "visual", "visual_all", "textual", "full")
    assert prompts.SETTINGS == PROMPT_SETTINGS and prompts.Setting is PromptSetting
    assert PromptSettings.model_fields["setting"].annotation is PromptSetting
    assert InspectOptions.model_fields["prompt_setting"].annotation == PromptSetting | None
    assert InspectionResult.model_fields["prompt_setting"].annotation == PromptSetting | None


def test_no_second_definition_of_the_prompt_settings_in_the_sources():
    import re

    root = Path(__file__).resolve().parent.parent
    literal = re.compile(r"""Literal\[\s*["']baseline["'],\s*["']visual["']""")
    defined = [
        str(path.relative_to(root))
        for package in ("app", "deploy", "eagle", "expert", "mllm")
        for path in (root / package).rglob("*.py")
        if literal.search(path.read_text(encoding="utf-8"))
    ]
    assert defined == ["mllm/config.py"]
