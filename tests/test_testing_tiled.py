"""The tiny LLaVA-NeXT / InternVL builders and their tiled inputs (vtc.testing)."""

from __future__ import annotations

import functools

import pytest
import torch

from vtc.testing import image_token_count, llava_next_shaped, tiled_inputs, tiny_internvl, tiny_llava, tiny_llava_next

torch.set_num_threads(1)

TEXT_MODELS = ["llama", "qwen2"]
LAYOUTS = {
    "llava_next": {"batch": [[(56, 112)], [(112, 112)]], "two": [[(112, 56), (40, 77)]]},
    "internvl": {"batch": [[3], [5]], "two": [[2, 5]]},
}


@functools.cache
def build(family: str, text_model: str):
    make = tiny_llava_next if family == "llava_next" else tiny_internvl
    return make(layers=2, vision_layers=2, text_model=text_model)


def image_rows(model, inputs) -> list[int]:
    """Feature rows the model produces per image, from get_image_features."""
    with torch.no_grad():
        if model.config.model_type == "llava_next":
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            return [len(f) for f in out.pooler_output]
        out = model.model.get_image_features(inputs["pixel_values"])
        return [out.pooler_output.shape[1]] * out.pooler_output.shape[0]  # one entry per tile


@pytest.mark.parametrize("text_model", TEXT_MODELS)
@pytest.mark.parametrize("family", ["llava_next", "internvl"])
@pytest.mark.parametrize("layout", ["batch", "two"])
def test_forward_and_counts(family, text_model, layout):
    model = build(family, text_model)
    images = LAYOUTS[family][layout]
    inputs = tiled_inputs(model, images=images, text=7)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(images)
    token = model.config.image_token_id
    counts = [[image_token_count(model, image) for image in sample] for sample in images]
    assert (ids == token).sum(1).tolist() == [sum(c) for c in counts]
    assert (mask.sum(1) == torch.tensor([sum(c) + 7 for c in counts])).all()
    rows = image_rows(model, inputs)
    flat = [image for sample in images for image in sample]
    if family == "llava_next":
        assert rows == [c for sample in counts for c in sample]
        assert inputs["image_sizes"].tolist() == [list(hw) for hw in flat]
    else:  # one row block per tile
        assert len(rows) == sum(flat) == inputs["pixel_values"].shape[0]
        assert all(r * n == image_token_count(model, n) for r, n in zip(rows, flat))
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_llava_next_count_matches_features_for_many_shapes():
    model = build("llava_next", "llama")
    shapes = [(30, 90), (90, 30), (60, 60), (100, 50), (50, 100), (40, 77), (500, 333)]
    inputs = tiled_inputs(model, images=[shapes])
    assert image_rows(model, inputs) == [image_token_count(model, hw) for hw in shapes]
    assert inputs["pixel_values"].shape[:2] == (len(shapes), 5)  # zero-padded tile axis (2x2 grid + base)
    assert inputs["pixel_values"][0, 3:].abs().sum() == 0  # (30, 90): 1x2 grid + base = 3 tiles


def test_left_padding_and_pad():
    model = build("internvl", "qwen2")
    inputs = tiled_inputs(model, images=[[1], [3]], text=4, pad=[2, 0])
    mask = inputs["attention_mask"]
    assert mask.sum(1).tolist() == [16 + 4, 48 + 4]
    assert mask.shape[1] == 48 + 4 and (mask[:, -1] == 1).all()
    assert (inputs["input_ids"][mask == 0] == 0).all()
    inputs = tiled_inputs(model, images=[[3], [3]], text=4, pad=[0, 5])
    assert inputs["attention_mask"].sum(1).tolist() == [52, 52] and inputs["input_ids"].shape[1] == 57


def test_config_details():
    nxt, ivl = build("llava_next", "llama"), build("internvl", "qwen2")
    assert nxt.config.image_token_id == ivl.config.image_token_id == 127
    assert nxt.config.vision_feature_layer == -2 and ivl.config.vision_feature_layer == -1
    assert ivl.config.image_seq_length == 16 and not nxt.training and not ivl.training
    assert type(ivl.model.vision_tower.encoder.layer[0].attention.q_norm).__name__ != "Identity"
    assert image_token_count(tiny_llava(layers=1, vision_layers=1), None) == 16


def test_llava_next_shaped_counts():
    model = llava_next_shaped(width=64, layers=1, vision_layers=1, vision_width=32)
    assert model.config.image_grid_pinpoints[-1] == [336, 1008]
    assert image_token_count(model, (672, 672)) == 2928
    inputs = tiled_inputs(model, images=[[(672, 672), (336, 1008)]], text=4)  # 2x2 grid, 1x3 grid (pinpoint set)
    assert inputs["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert image_rows(model, inputs) == [2928, image_token_count(model, (336, 1008))] == [2928, 2328]
