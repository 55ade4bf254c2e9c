"""The reference profile, the paper's Table 3 visual-only row and the selectable answer parsers, against literals.

Each expectation is written out by hand from the reference code (``shengtun/Eagle``) or the paper, not computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from eagle.evaluation.profile import PROFILES, EvalProfile, ProfileError, resolve_profile
from eagle.settings import Settings
from expert.boxes import Box, find_boxes, merge_boxes, merge_boxes_reference
from mllm.answers import parse_answer, parse_answer_keyword, parse_answer_reference, parse_with
from mllm.prompts import (
    INSTRUCTION,
    INSTRUCTION_REFERENCE,
    INTERNVL_TEXTS,
    QWEN_TEXTS,
    PromptError,
    build_prompt,
    prompt_texts,
)
from tests.fixtures_pipeline import pipeline_settings, split_test_images

# ------------------------------------------------------------------------------------------ answer parsers

# reply -> (eagle, reference, keyword) answers
ANSWERS = {
    "Yes, there is a scratch.": ("yes", "yes", "yes"),
    "No defect found.": ("no", "no", "no"),
    "The object appears normal.": ("no", "yes", "no"),  # reference: difflib finds "Yes" closer than "No"
    "There is no anomaly": ("no", "yes", "no"),
    "B": ("no", "no", "no"),
    "A": ("yes", "yes", "yes"),
    "A. Yes": ("yes", "yes", "yes"),
    "A. No": ("yes", "yes", "no"),  # letter first (eagle, reference) vs words first (keyword)
    "A scratch is visible, so B.": ("no", "no", "yes"),
    "Abnormal": ("yes", "no", "yes"),  # reference: "Abnormal" is closer to "No" than to "Yes"
    "The image shows a defect on the surface.": ("yes", "yes", "yes"),
    "No. There is a defect": ("unknown", "no", "unknown"),
    "I cannot tell": ("unknown", "no", "unknown"),
    "": ("unknown", "yes", "unknown"),  # reference: a tie at ratio 0, difflib keeps the larger string, "Yes"
}


@pytest.mark.parametrize(("reply", "expected"), list(ANSWERS.items()))
def test_the_three_parsers_on_real_looking_answers(reply, expected):
    got = tuple(parse_with(name, reply).answer for name in ("eagle", "reference", "keyword"))
    assert got == expected


def test_reference_parser_takes_the_last_capital_letter_and_counts_the_article():
    assert parse_answer_reference("A. The answer is B") == parse_answer_reference("B")
    assert parse_answer_reference("A scratch").letter == "A"  # \b[A-E]\b is case-sensitive, the article counts
    assert parse_answer_reference("C").answer == "unknown"  # a letter that is no option: the summary skips it
    found = parse_answer_reference("no", {"A": "No.", "B": "Yes."})  # an MMAD item in reversed order
    assert (found.letter, found.answer, found.source) == ("A", "no", "closest")


def test_keyword_parser_reads_a_letter_only_when_no_word_decides():
    assert parse_answer_keyword("B").source == "letter"
    assert parse_answer_keyword("B. No").source == "keyword"
    assert parse_answer_keyword("A/B").answer == "unknown"
    assert parse_answer("A. No").answer == "yes" and parse_answer_keyword("A. No").answer == "no"
    with pytest.raises(ValueError, match="unknown answer parser"):
        parse_with("fuzzy", "A")


# ------------------------------------------------------------------------------------------ box merge


def test_reference_merge_is_one_pass_within_20_px():
    a, b, c = Box(0, 0, 10, 10, 3.0), Box(30, 0, 40, 10, 2.0), Box(15, 0, 25, 10, 1.0)
    # c's centre is 15 px from a's and from b's: a (strongest) takes it, b stays alone
    assert merge_boxes_reference([c, b, a]) == [Box(0, 0, 25, 10, 3.0), Box(30, 0, 40, 10, 2.0)]
    # ours: centres 15 px apart are not close for 10-px boxes (< 0.5 · 14.1 px), nothing merges
    assert merge_boxes([c, b, a]) == [a, b, c]
    # exactly 20 px is not "within" (strict <); IoU 1/3 > 0.3 merges
    assert merge_boxes_reference([Box(0, 0, 10, 10, 1.0), Box(20, 0, 30, 10, 0.5)]) == [
        Box(0, 0, 10, 10, 1.0),
        Box(20, 0, 30, 10, 0.5),
    ]
    assert merge_boxes_reference([Box(0, 0, 10, 10, 1.0), Box(5, 0, 15, 10, 0.5)]) == [Box(0, 0, 15, 10, 1.0)]


def test_find_boxes_uses_the_selected_rule():
    amap = np.zeros((100, 100), np.float32)
    amap[20:30, 20:30] = 1.0
    amap[20:30, 35:45] = 0.75  # centres 15 px apart
    assert find_boxes(amap) == [Box(20, 20, 30, 30, 1.0), Box(35, 20, 45, 30, 0.75)]
    assert find_boxes(amap, merge="reference") == [Box(20, 20, 45, 30, 1.0)]
    with pytest.raises(ValueError, match="box-merge rule"):
        find_boxes(amap, merge="nms")


# ------------------------------------------------------------------------------------------ prompt texts


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


QUERY, TEMPLATE, BOXED = _image(1), _image(2), _image(3)


def test_reference_instruction_is_instruction_sample_verbatim():
    assert INSTRUCTION_REFERENCE == (
        "\nYou are an industrial inspector who checks products by images.\n"
        "You should judge whether there is a defect in the query image and answer the questions about it.\n "
    )
    prompt = build_prompt(
        query=QUERY, template=None, boxed=None, expert_anomalous=False, setting="full", instruction="reference"
    )
    assert prompt.messages[0]["content"][0]["text"] == INSTRUCTION_REFERENCE
    default = build_prompt(query=QUERY, template=None, boxed=None, expert_anomalous=False, setting="full")
    assert default.messages[0]["content"][0]["text"] == INSTRUCTION
    with pytest.raises(PromptError, match="unknown instruction"):
        build_prompt(query=QUERY, template=None, boxed=None, expert_anomalous=False, setting="full", instruction="x")


def test_internvl_texts_are_the_references_connector_strings():
    """``Connector.create_prompt`` writes these with ``<image>`` placeholders; ours split at them."""
    assert INTERNVL_TEXTS.query + "<image> " == "Following is the query image: \n<image> "
    assert (
        INTERNVL_TEXTS.query_normal + "<image> "
        == "\nFollowing is the query image, The query image is predicted as normal: \n<image> "
    )
    assert INTERNVL_TEXTS.query_anomalous + "<image>" + INTERNVL_TEXTS.boxed + "<image>" == (
        "Following is the query image,The query image is predicted as anomalous: \n<image> "
        "\nFollowing is the query image with red bounding box, The position of the red bounding box on the query "
        "image is the predicted defect location.\n<image>"
    )
    assert prompt_texts("internvl") is INTERNVL_TEXTS
    assert prompt_texts("qwen2.5-vl") is QWEN_TEXTS and prompt_texts("llava") is QWEN_TEXTS
    prompt = build_prompt(
        query=QUERY, template=None, boxed=BOXED, expert_anomalous=True, setting="full", texts=INTERNVL_TEXTS
    )
    texts = [part.get("text") for part in prompt.messages[0]["content"]]
    assert texts[2:6] == [INTERNVL_TEXTS.query_anomalous, None, INTERNVL_TEXTS.boxed, None]


def test_visual_all_sends_the_boxes_on_a_normal_image():
    """Paper §4.3: the visual-only row gives the expert's boxes for ALL images, normal ones included."""
    for verdict in (False, True, None):
        prompt = build_prompt(
            query=QUERY, template=TEMPLATE, boxed=BOXED, expert_anomalous=verdict, setting="visual_all"
        )
        assert prompt.boxed_included and prompt.images[-1] is BOXED
        assert prompt.query_text == QWEN_TEXTS.query  # no textual prior
    gated = build_prompt(query=QUERY, template=TEMPLATE, boxed=BOXED, expert_anomalous=False, setting="visual")
    assert not gated.boxed_included and len(gated.images) == 2
    with pytest.raises(PromptError, match="always needs the boxed image"):
        build_prompt(query=QUERY, template=TEMPLATE, boxed=None, expert_anomalous=False, setting="visual_all")


# ------------------------------------------------------------------------------------------ the profile


def test_profiles_literal_choices_and_settings():
    assert PROFILES["paper"] == EvalProfile("paper", True, "paper", "eagle", "eagle")
    assert PROFILES["reference"] == EvalProfile("reference", False, "reference", "reference", "reference")
    settings = resolve_profile("reference").apply(Settings())
    assert (settings.prompt.template, settings.prompt.instruction, settings.prompt.answer_parser) == (
        False,
        "reference",
        "reference",
    )
    assert settings.expert.box_merge == "reference" and Settings().expert.box_merge == "eagle"
    keyword = resolve_profile("reference", parser="keyword")
    assert keyword.label == "reference+parser=keyword" and keyword.record()["answer_parser"] == "keyword"
    assert resolve_profile("reference", parser="reference").label == "reference"
    with pytest.raises(ProfileError, match="--profile"):
        resolve_profile("mmad")
    with pytest.raises(ProfileError, match="--parser"):
        resolve_profile("paper", parser="fuzzy")


def test_eval_cli_takes_profile_and_parser(tmp_path):
    from eagle.evaluation.cli import build_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--dataset", "mvtec", "--root", str(tmp_path)])
    assert build_config(args).profile == PROFILES["paper"]
    args = parser.parse_args(
        ["eval", "--dataset", "mvtec", "--root", str(tmp_path), "--profile", "reference", "--parser", "keyword"]
    )
    assert build_config(args).profile.label == "reference+parser=keyword"
    assert "visual_all" in [s.name for s in build_config(args).settings]


def test_run_json_records_the_profile(tmp_path, synthetic_root):
    from eagle.evaluation.runner import EvalConfig, EvalRunner, bank_root
    from tests.fake_pipeline import FakePipeline

    config = EvalConfig(
        dataset="mvtec",
        root=synthetic_root,
        out=tmp_path / "out",
        limit=1,
        progress=False,
        plots=False,
        pixel_metrics=False,
        profile=resolve_profile("reference"),
    )
    pipeline = FakePipeline(bank_root(config), mllm_enabled=False)
    EvalRunner(pipeline, Settings(expert={"weights": "random"}), config).run(report=False)
    run = json.loads((config.out / "run.json").read_text())
    assert run["identity"]["profile"] == "reference"
    assert run["profile"] == {
        "label": "reference",
        "name": "reference",
        "template": False,
        "instruction": "reference",
        "box_merge": "reference",
        "answer_parser": "reference",
        "parser_overridden": False,
    }


# ------------------------------------------------------------------------------------------ through the pipeline


def test_pipeline_visual_all_boxes_a_normal_image_and_reference_sends_no_template(
    built_pipeline, tiny_qwen_dir, synthetic_root, monkeypatch
):
    from eagle.images import load_image
    from eagle.pipeline import Pipeline
    from eagle.records import InspectOptions
    from mllm.inspector import MLLMInspector

    settings = pipeline_settings(
        built_pipeline.pipeline.settings.data_dir, model_id=str(tiny_qwen_dir), max_new_tokens=2, max_pixels=56 * 56
    )
    pipeline = Pipeline(resolve_profile("reference").apply(settings))
    good, _ = split_test_images(synthetic_root)
    image = load_image(good[0], max_pixels=10**8)
    expert = dataclasses.replace(pipeline.run_expert(image, "widget"), anomalous=False, boxes=[])
    seen = []
    real_ask = MLLMInspector.ask

    def spy(self, **kwargs):
        seen.append(kwargs)
        return real_ask(self, **kwargs)

    monkeypatch.setattr(MLLMInspector, "ask", spy)
    results = [
        pipeline.finish(image, expert, "widget", InspectOptions(prompt_setting=setting, caas="off", explain=False))
        for setting in ("visual_all", "visual")
    ]
    every, gated = seen
    assert results[0].boxes and not results[1].boxes  # the record holds the boxes the model was shown
    assert results[0].expert_decision == "normal"
    explained = []
    real_explain = MLLMInspector.explain_stream

    def explain_spy(self, **kwargs):
        explained.append(kwargs)
        return real_explain(self, **kwargs)

    monkeypatch.setattr(MLLMInspector, "explain_stream", explain_spy)
    "".join(pipeline.explain_stream(image, results[0]))  # the app's streamed explanation: the answer turn's views
    assert explained[0]["template"] is None and explained[0]["boxed"] is not None
    assert every["expert_anomalous"] is False and every["boxed"] is not None  # boxes sent although "normal"
    assert gated["boxed"] is None
    assert every["template"] is None and gated["template"] is None  # the reference profile: no template
    assert np.any(np.all(np.asarray(every["boxed"]) == (255, 0, 0), axis=2))  # red frames were drawn
