"""CDPruner against a reference of its official selection, on tiny LLaVA-1.5-shaped models.

The reference is written from Theia-4869/CDPruner (``llava/model/llava_arch.py`` ``encode_images``
L141-187, lines cited below) and runs on the *unpatched* model's own tower, projector and input
embeddings; it shares nothing with vtc. Its relevance uses the fallback vtc implements for models
without a CLIP text tower: the question's LLM input embeddings against the projected features (the
official LLaVA code uses CLIP's text tower and visual projection, which Hugging Face LLaVA checkpoints
lack). Images are 336px with 14px patches (576 tokens, as LLaVA-1.5); the LLM is 256 wide so the
kernel's rank exceeds every budget, as on the real 4096-wide model.
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
    return tiny_llava(image_size=336, vision_layers=3, layers=2, hidden=256, attn=attn)


def official_cdpruner(image_features, image_embeds, text_embeds, visual_token_num: int, negative: bool = True):
    """``llava_arch.py`` ``encode_images``: cosine similarity of the projected features in float (L150-153);
    relevance = mean over text embeddings of the (negated, L159) cosine similarity, min-max normalized
    with ``+ 1e-6`` (L155-160); kernel ``r_i S_ij r_j`` (L167); fast greedy MAP inference (L169-182); the
    picks sorted (L183)."""
    B, N, _ = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance if negative else relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return torch.sort(select_idx.t()).values


def reference(model, inputs, count: int, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (the official runs batch size 1): the projected features, and as the instruction the
    input embeddings of the prompt's rows after the image (padding excluded)."""
    config = model.config
    picks, feats = [], []
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        projected = model.model.multi_modal_projector(hidden[config.vision_feature_layer][:, 1:])
        for b, ids in enumerate(inputs["input_ids"]):
            image = (ids == config.image_token_id).nonzero()[:, 0]
            question = ids[int(image[-1]) + 1:][inputs["attention_mask"][b, int(image[-1]) + 1:].bool()]
            text = model.get_input_embeddings()(question)
            picks.append(official_cdpruner(projected[b:b + 1], projected[b:b + 1].float(), text.float(), count,
                                           negative)[0])
            feats.append(projected[b])
    return torch.stack(picks), torch.stack(feats)


llm_input = functools.partial(shared_llm_input, method="cdpruner")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cdpruner_keeps_the_official_tokens(attn):
    model = _model(attn)
    inputs = tiny_inputs(model, batch=2, seed=5, pad=[0, 2])
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    for budget, negative in [(None, False), (64, False), (128, False), (192, False), (64, True), (192, True)]:
        count = 128 if budget is None else budget
        ref, feats = reference(model, inputs, count, negative)
        assert ref.unique(dim=1).shape[1] == count  # the official picks never repeat here
        params = {"negative": negative} | ({} if budget is None else {"budget": budget})
        embeds, kept = llm_input(model, inputs, **params)
        assert torch.equal(kept, ref), (budget, negative)
        assert embeds.shape[1] == inputs["input_ids"].shape[1] - 576 + count
        torch.testing.assert_close(embeds[0, start:start + count], feats[0][ref[0]])


def test_cdpruner_reads_the_question():
    """Another question after the same image keeps other tokens; text before the image does not count."""
    model = _model("sdpa")
    inputs = tiny_inputs(model, seed=5)
    ids = inputs["input_ids"]
    after = int((ids[0] == model.config.image_token_id).nonzero()[-1]) + 1
    _, kept = llm_input(model, inputs, budget=64)
    other = dict(inputs, input_ids=ids.clone())
    question = torch.randint(3, 100, (ids.shape[1] - after,), generator=torch.Generator().manual_seed(9))
    other["input_ids"][0, after:] = question
    assert not torch.equal(llm_input(model, other, budget=64)[1], kept)
    prefix = dict(inputs, input_ids=ids.clone())
    prefix["input_ids"][0, : after - 576 - 1] = 7
    assert torch.equal(llm_input(model, prefix, budget=64)[1], kept)


def test_dpp_select_batched_equals_per_image_and_never_repeats():
    torch.manual_seed(0)
    x, r = torch.randn(3, 40, 16), torch.rand(3, 40) + 0.1
    got = ops.dpp_select(x, r, 12)
    for i in range(3):
        assert torch.equal(got[i], ops.dpp_select(x[i:i + 1], r[i:i + 1], 12)[0])
    # More picks than the features' width (the kernel's rank): distinct tokens still.
    assert ops.dpp_select(x, r, 30).unique(dim=1).shape[1] == 30
    assert torch.equal(ops.dpp_select(x[:1], r[:1], 40)[0], torch.arange(40))
    with pytest.raises(ValueError):
        ops.dpp_select(x, r, 0)


def test_cdpruner_defaults():
    stage = vtc.plan(_model("sdpa"), "cdpruner").stages[0]
    assert stage.keep == 128 and stage.positions == "compact" and stage.reducer == "cdpruner"
    assert dict(stage.options) == {"negative": 0}
