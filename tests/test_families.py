"""What is particular to the tiled families (LLaVA-NeXT, InternVL): the token layouts vtc reads
are checked against direct computations; HiRED's budget sharing on constructed score maps.

The shared test matrix (tests/test_equivalence.py) runs every method on both families.
"""

from __future__ import annotations

import functools

import pytest
import torch

import vtc
from vtc import ops
from vtc.registry import get_adapter
from vtc.testing import tiled_inputs, tiny_llava, tiny_model

torch.set_num_threads(1)


@functools.cache
def _eager(family: str):
    model = tiny_model(family, attn="eager")
    return model


def tower_cls_rows(model, pixel_values, layer: int) -> torch.Tensor:
    """[CLS]-to-patch attention at vision ``layer`` from the eager tower's own weights ``[tiles, patches]``."""
    out = model.model.vision_tower(pixel_values=pixel_values, output_attentions=True)
    return out.attentions[layer][:, :, 0, 1:].mean(dim=1)


def vtc_signal(model, inputs, layer: int) -> list[torch.Tensor]:
    """The [CLS] score vtc lines up with each ``pooler_output`` entry, read while encoding."""
    image_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
    with vtc.compressed(model, "vtc_cls", budget=0.5, layers=(layer,)), torch.no_grad():
        out = model.model.get_image_features(**image_inputs)
        record = out.vtc_signals
    return [record[(e.data_ptr(), tuple(e.shape))][f"cls{(layer,)}"] for e in out.pooler_output]


def test_llava_next_scores_follow_the_packing():
    model = _eager("llava_next")
    inputs = tiled_inputs(model, images=[[(112, 112), (56, 224)]])  # a 2x2 grid, and a 1x2 grid unpadded
    g = 4  # 56px tiles of 14px patches
    with torch.no_grad():
        tiles = inputs["pixel_values"][0]  # the square image: base + 4 tiles
        direct = tower_cls_rows(model, tiles, layer=2)
    got = vtc_signal(model, inputs, layer=2)
    # Packed order, written out: the base image's 16 patches, then the 8x8 canvas of the 2x2
    # tiles row by row, each row ended by a newline (score 0).
    expected = [direct[0]]
    for y in range(2 * g):
        row = [direct[1 + (y // g) * 2 + x // g, (y % g) * g + x % g] for x in range(2 * g)]
        expected.append(torch.stack([*row, torch.zeros(())]))
    torch.testing.assert_close(got[0], torch.cat(expected), atol=1e-6, rtol=1e-5)
    # The wide image fills half of its 56x112 canvas: 2 of the 4 canvas rows are removed.
    layout = get_adapter(model).layout({**inputs, "vision_feature_select_strategy": "default"})
    assert got[1].shape[0] == layout[1]["tile"].shape[0] == 16 + 2 * (2 * g + 1)
    assert int(layout[1]["protected"].sum()) == 2 and bool((got[1][layout[1]["protected"]] == 0).all())


def test_llava_next_base_regions_follow_the_tiles():
    model = _eager("llava_next")
    layout = get_adapter(model).layout({**tiled_inputs(model, images=[[(112, 112)]]),
                                        "vision_feature_select_strategy": "default"})[0]
    base = layout["region"][layout["tile"] == 0].view(4, 4)
    # A square image: each quarter of the base image is shown by the tile in that quarter.
    assert base.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    tiles = layout["tile"][layout["tile"] > 0]
    assert torch.equal(layout["region"][layout["tile"] > 0], tiles)


def test_internvl_scores_follow_the_pixel_shuffle():
    model = _eager("internvl")
    inputs = tiled_inputs(model, images=[[2]])
    with torch.no_grad():
        direct = tower_cls_rows(model, inputs["pixel_values"], layer=3)  # [2 tiles, 64 patches]
    got = vtc_signal(model, inputs, layer=3)  # one entry per tile, 16 tokens each
    grid = direct.view(2, 8, 8)
    # Token (r, c) of a tile is the 2x2 patches (2r.., 2c..): its score is their mean.
    expected = grid.view(2, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(2, 16)
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-6, rtol=1e-5)


def test_hired_shares_the_tile_budget_by_early_attention_regions():
    # A 2x2-tiled image: 16 base tokens (regions as in the quarter test above), 4 tiles of 16.
    region_of_base = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]).flatten()
    tile = torch.cat([torch.zeros(16, dtype=torch.long), torch.arange(1, 5).repeat_interleave(16)])
    region = torch.cat([region_of_base, tile[16:]])
    late = torch.rand(80, generator=torch.Generator().manual_seed(0))
    early = torch.zeros(80)
    early[[0, 1, 4, 5]] = 5.0  # the top-left quarter: region of tile 1
    early[[2, 3]] = 4.0  # half as much in tile 2's quarter
    keep = ops.hired_select(late, early, tile, region, keep=12, alpha=0.5)
    per_tile = torch.bincount(tile[keep], minlength=5).tolist()
    # 6 to the base image; the base's 6 best early tokens are 4 in region 1 and 2 in region 2,
    # so the tiles' 6 go 4 to tile 1 and 2 to tile 2.
    assert per_tile == [6, 4, 2, 0, 0]
    # Within a tile the late score decides.
    mine = keep[tile[keep] == 1]
    assert torch.equal(mine, (16 + late[16:32].topk(per_tile[1]).indices).sort().values)


def test_hired_everything_to_the_base_when_alpha_is_one():
    tile = torch.tensor([0] * 4 + [1] * 4)
    keep = ops.hired_select(torch.arange(8.0), torch.ones(8), tile, tile.clone(), keep=3, alpha=1.0)
    assert keep.tolist() == [1, 2, 3]


def test_hired_keeps_row_ends_and_a_fifth_by_default():
    model = tiny_model("llava_next")
    inputs = tiled_inputs(model, images=[[(112, 112)]])
    with vtc.compressed(model, "hired"), torch.no_grad():
        model(**inputs)
        stats = vtc.stats(model)
    assert stats.image_tokens == 88 and stats.tokens_entering_llm == round(0.2 * 88)
    kept = stats.kept["vision"][0]
    layout = get_adapter(model).layout({**inputs, "vision_feature_select_strategy": "default"})[0]
    assert bool(layout["protected"][kept].sum() == 8)  # every row end of the 8 canvas rows


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_hired_refuses_families_without_tile_regions(family):
    model = tiny_llava() if family == "llava" else tiny_model("internvl", layers=1, vision_layers=1)
    with pytest.raises(vtc.VtcError, match="hired.*llava_next only"):
        vtc.apply(model, "hired")
    assert not vtc.is_applied(model)


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_pool_refuses_tiled_images(family):
    model = tiny_model(family, layers=1, vision_layers=1)
    with pytest.raises(vtc.VtcError, match="square token grid.*tiled"):
        vtc.plan(model, "pool", budget=0.25)


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_adapter_chosen_by_class_and_model_type(tmp_path, family):
    tiny_model(family, layers=2, vision_layers=1).save_pretrained(tmp_path)
    model = vtc.from_pretrained(str(tmp_path), method="fastv", budget=0.75, layer=1)
    assert model.__dict__["_vtc"].adapter.family == family
    assert type(model).__name__ in vtc.list_models()


def test_a_budget_counts_tokens_of_the_largest_image():
    model = tiny_model("llava_next")
    plan = vtc.plan(model, "vtc_cls", budget=44)  # half of the 88 tokens of a 112x112 image
    assert plan.image_tokens == 88 and plan.keeps_for(88) == [44] and plan.keeps_for(52) == [26]
    internvl = tiny_model("internvl", layers=1, vision_layers=1)
    assert vtc.plan(internvl, "vtc_cls", budget=0.25).image_tokens == 13 * 16  # 12 tiles and a thumbnail


def test_cost_records_of_an_unpatched_tiled_model_count_each_image():
    from vtc.eval.meter import GenerateMeter
    from vtc.testing import image_token_count

    model = tiny_model("llava_next", layers=2, vision_layers=1)
    inputs = tiled_inputs(model, images=[[(112, 112), (56, 112)]])
    record = GenerateMeter(model)._tokens(inputs)
    sizes = [image_token_count(model, (112, 112)), image_token_count(model, (56, 112))]
    assert record["images"] == 2 and record["equivalent_tokens"] == sum(sizes) / 2
    assert record["flops"] == vtc.flops.prefill_flops(get_adapter(model).info(), None,
                                                      inputs["input_ids"].shape[1] - sum(sizes), sizes)


def test_padding_slots_are_masked_in_every_mask_form():
    from vtc.patches.decoder import mask_columns

    valid = torch.tensor([[False, True, True]])
    rows = torch.tensor([[1, 1, 2]])  # a padding slot repeating row 1, then rows 1 and 2
    built = mask_columns(None, valid, rows, flash=False)[0, 0]
    # Causal by original row, never the padding slot as a key; as a query the slot sees what
    # its row sees (its output is never used, its row is just not empty).
    assert built.tolist() == [[True, True, False], [False, True, False], [False, True, True]]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
    assert mask_columns(causal, valid, rows, flash=False)[0, 0, :, 0].tolist() == [False] * 3
    additive = torch.zeros(1, 1, 3, 3)
    assert bool((mask_columns(additive, valid, rows, flash=False)[..., 0] == torch.finfo(torch.float32).min).all())
    assert mask_columns(torch.ones(1, 3, dtype=torch.long), valid, rows, flash=True).tolist() == [[0, 1, 1]]
    assert mask_columns(None, valid, rows, flash=True).tolist() == [[0, 1, 1]]
    # A decode step: two new tokens after the prompt, one query row.
    step = mask_columns(None, valid, rows, flash=False, new=2, queries=1)[0, 0]
    assert step.tolist() == [[False, True, True, True, True]]
