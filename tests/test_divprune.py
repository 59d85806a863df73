"""DivPrune against a reference of its official selection, on tiny LLaVA-1.5-shaped models.

The reference is written from vbdi/divprune (``LLaVA/llava/model/llava_arch.py``, lines cited
below) and runs on the *unpatched* model's own tower and projector; it shares nothing with vtc.
Images are 336px with 14px patches (576 tokens, as LLaVA-1.5), so the official default ratio
0.098 keeps its real 56 tokens.
"""

from __future__ import annotations

import functools

import pytest
import torch

import vtc
from vtc import ops
from vtc.testing import tiny_inputs, tiny_llava

from .reference import llm_input as shared_llm_input

torch.set_num_threads(1)


@functools.cache
def _model(attn: str):
    return tiny_llava(image_size=336, vision_layers=3, layers=2, attn=attn)


def projected_features(model, pixel_values):
    """Each image's tokens as the LLM receives them: the tower's layer ``vision_feature_layer``
    without [CLS], through the projector (the official code prunes ``new_input_embeds``, the
    projected features, llava_arch.py L374)."""
    config = model.config
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        return model.model.multi_modal_projector(hidden[config.vision_feature_layer][:, 1:])


def official_divprune(visual_feature_vectors, threshold_terms: int) -> torch.Tensor:
    """vbdi/divprune ``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity`` (L147-150:
    rows divided by their norms, ``torch.mm`` with the transpose) and ``DivPrune`` (L152-171:
    ``cosine_matrix = 1 - similarity``; step 0 scores each column by its 2nd smallest entry, via
    ``topk(m2, 2, dim=0, largest=False).values[1, :]``; later steps by the column minimum over
    the rows already selected; ``argmax`` each step). The selection is then sorted
    (L378-379: ``keep_indexs.sort()``). ``threshold_terms = int(round(ratio * len))`` (L153)."""
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:  # L159-160, L164-165
            m2 = cosine_matrix
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:  # L161-162, L166-167
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s.sort().values


llm_input = functools.partial(shared_llm_input, method="divprune")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_divprune_keeps_the_official_tokens(attn):
    model = _model(attn)
    inputs = tiny_inputs(model, batch=2, seed=5)
    feats = projected_features(model, inputs["pixel_values"])
    assert feats.shape[1] == 576
    for budget in (None, 64, 128, 192):
        count = int(round(0.098 * 576)) if budget is None else budget  # SUBSET_RATIO=0.098 (run_Divprune.sh L11)
        ref = torch.stack([official_divprune(f, count) for f in feats])
        assert ref.unique(dim=1).shape[1] == count  # no repeats in the official picks here
        embeds, kept = llm_input(model, inputs, **({} if budget is None else {"budget": budget}))
        assert torch.equal(kept, ref), budget
        # The LLM gets the kept projected features, in order, in place of the 576.
        assert embeds.shape[1] == inputs["input_ids"].shape[1] - 576 + count
        start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
        torch.testing.assert_close(embeds[0, start:start + count], feats[0][ref[0]])


def test_divprune_select_batched_equals_per_image_and_never_repeats():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 16)
    got = ops.divprune_select(x, 12)
    for i in range(3):
        assert torch.equal(got[i], official_divprune(x[i], 12))
    # Duplicated tokens: the official loop could pick one twice; vtc picks distinct tokens.
    dup = torch.cat([x[0, :5], x[0, :5]])
    assert ops.divprune_select(dup, 8).unique().numel() == 8
    assert torch.equal(ops.divprune_select(x[0], 40), torch.arange(40))
    with pytest.raises(ValueError):
        ops.divprune_select(x, 0)


def test_divprune_defaults():
    plan = vtc.plan(_model("sdpa"), "divprune")
    assert plan.stages[0].keep == 56 and plan.stages[0].positions == "compact"
    assert plan.stages[0].reducer == "divprune"
