"""The precision benchmark's kind names: which int8 recipe each one means (the benchmark itself is not a test)."""

from __future__ import annotations

import pytest

from bench.bench_precision import kind_recipe
from expert.quantize import DEFAULT_RECIPE, QuantRecipe


def test_plain_int8_is_the_product_default_and_other_runtimes_have_no_recipe():
    assert kind_recipe("int8") == DEFAULT_RECIPE
    assert kind_recipe("fp32") is None
    assert kind_recipe("int8-ov") is None


def test_named_kinds_start_from_the_plain_recipe_and_take_field_changes_parsed_as_json():
    assert kind_recipe("int8-plain") == QuantRecipe() != DEFAULT_RECIPE
    recipe = kind_recipe("int8-s8sym:fp32_last_convs=2:method=percentile")
    assert (recipe.activations, recipe.symmetric_activations, recipe.quantized_ops) == ("int8", True, "all")
    assert (recipe.fp32_last_convs, recipe.method) == (2, "percentile")
    changed = kind_recipe("int8:flip_augment=true")
    assert changed.flip_augment is True and changed.quantized_ops == DEFAULT_RECIPE.quantized_ops


def test_an_unknown_field_names_the_known_ones():
    with pytest.raises(SystemExit, match="unknown recipe field 'speed'.*known: activations"):
        kind_recipe("int8:speed=11")
