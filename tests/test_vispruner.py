"""VisPruner against a reference of its official selection, on tiny LLaVA-1.5-shaped models.

The reference is written from Theia-4869/VisPruner (``llava/model/llava_arch.py`` ``encode_images``
L140-186 and ``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select`` L35-52, lines cited
below) and runs on the *unpatched* model's own tower (attention weights from an eager copy with the
same weights) and projector; it shares nothing with vtc. Images are 336px with 14px patches (576
tokens, as LLaVA-1.5).
"""

from __future__ import annotations

import functools

import pytest
import torch

import vtc
from vtc import ops
from vtc.testing import tiny_inputs, tiny_llava

from .reference import llm_input

torch.set_num_threads(1)


@functools.cache
def _model(attn: str):
    return tiny_llava(image_size=336, vision_layers=3, layers=2, attn=attn)


def official_vispruner(model, pixel_values, visual_token_num: int, important_ratio: float):
    """``clip_encoder.py``: features ``hidden_states[select_layer][:, 1:]`` and attentions
    ``attentions[select_layer][:, :, 0, 1:]`` (L35-52); ``llava_arch.py`` ``encode_images``: head mean and
    descending argsort (L153-157), important ``int(T * r)`` (L150-151), duplicates removed in rounds of
    ``r = min(8, R - T_div)`` over even/odd halves of the residual list (L159-176), the selection as a mask
    (L178-183), features projected after (L185). Returns the kept indices and the projected features."""
    eager = _model("eager")
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
        image_features = out.hidden_states[layer][:, 1:]
        image_attentions = out.attentions[layer][:, :, 0, 1:]
        B, N, C = image_features.shape
        important_token_num = int(visual_token_num * important_ratio)
        diverse_token_num = visual_token_num - important_token_num
        image_attentions = image_attentions.mean(dim=1)
        token_indices = image_attentions.argsort(dim=-1, descending=True)
        important_indices = token_indices[:, :important_token_num]
        residual_indices = token_indices[:, important_token_num:]
        image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
        while diverse_token_num > 0:
            R = residual_indices.shape[1]
            r = min(8, R - diverse_token_num)
            if r <= 0:
                break
            residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
            a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
            scores = a @ b.transpose(-1, -2)
            scores = scores.max(dim=-1).values
            distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
            residual_indices = torch.cat([
                residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
                residual_indices[..., 1::2],
            ], dim=-1)
        selected = torch.cat([important_indices, residual_indices], dim=-1) if diverse_token_num > 0 \
            else important_indices
        index_masks = torch.zeros(B, N, dtype=torch.bool)
        index_masks.scatter_(1, selected, True)
        projected = model.model.multi_modal_projector(image_features)
    return [m.nonzero()[:, 0] for m in index_masks], projected


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vispruner_keeps_the_official_tokens(attn):
    model = _model(attn)
    inputs = tiny_inputs(model, batch=2, seed=5)
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    for budget, ratio in [(None, 0.5), (64, 0.5), (64, 0.75), (128, 0.5), (192, 0.5), (192, 0.25), (64, 1.0)]:
        count = 128 if budget is None else budget
        ref, projected = official_vispruner(model, inputs["pixel_values"], count, ratio)
        params = {"important": ratio} | ({} if budget is None else {"budget": budget})
        embeds, kept = llm_input(model, inputs, "vispruner", **params)
        assert torch.equal(kept, torch.stack(ref)), (budget, ratio)
        # The LLM gets the kept tokens' projected features, in order, in place of the 576.
        assert embeds.shape[1] == inputs["input_ids"].shape[1] - 576 + count
        torch.testing.assert_close(embeds[0, start:start + count], projected[0][ref[0]])


def test_vispruner_select_batched_equals_per_image():
    torch.manual_seed(0)
    x, s = torch.randn(3, 41, 16), torch.rand(3, 41)
    got = ops.vispruner_select(s, x, 12, 5)
    for i in range(3):
        assert torch.equal(got[i], ops.vispruner_select(s[i], x[i], 12, 5))
    assert got.unique(dim=1).shape[1] == 12
    # All important: the top-k by score.
    assert torch.equal(ops.vispruner_select(s, x, 7, 7), s.topk(7).indices.sort().values)
    assert torch.equal(ops.vispruner_select(s[0], x[0], 41, 3), torch.arange(41))
    with pytest.raises(ValueError):
        ops.vispruner_select(s, x, 5, 6)


def test_vispruner_defaults_and_refusal():
    plan = vtc.plan(_model("sdpa"), "vispruner")
    stage = plan.stages[0]
    assert stage.keep == 128 and stage.positions == "compact" and stage.reducer == "vispruner"
    assert dict(stage.options) == {"important": 0.5, "pre": 1} and stage.scorer.layers == (1,)
    with pytest.raises(vtc.VtcError):
        vtc.plan(_model("sdpa"), "vispruner", important=1.5)
