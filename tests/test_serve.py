"""Serving vtc with vLLM (docs/serving.md): the toy checkpoint's hub layout here; the plugin's
tests, which need scripts/setup_serve.sh's venv, follow."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from vtc.eval import toy


def test_toy_checkpoint_uses_the_hub_llava_layout():
    """The shipped toy names its tensors as llava-hf checkpoints do (vLLM's loader reads these
    names), and transformers loads every one of them into the model bit for bit."""
    from transformers import LlavaForConditionalGeneration

    tensors = load_file(toy.MODEL_PATH / "model.safetensors")
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"vision_tower", "multi_modal_projector", "language_model"}, prefixes
    assert all(k.startswith("vision_tower.vision_model.") for k in tensors if k.startswith("vision_tower."))
    state = LlavaForConditionalGeneration.from_pretrained(toy.MODEL_PATH).state_dict()
    for key, value in tensors.items():
        name = "model." + key.replace("vision_tower.vision_model.", "vision_tower.", 1).replace(
            "language_model.model.", "language_model.", 1
        )
        assert torch.equal(state[name], value), key


PRE_LLM = [("vtc_cls", 1 / 3), ("vtc_cls", 1 / 9), ("visionzip", 1 / 3), ("visionzip", 1 / 9), ("random", 1 / 3),
           ("pool", 1 / 9), ("merge", 1 / 3), ("divprune", 1 / 9)]


@pytest.fixture(scope="module")
def toy_model():
    return toy.load()


def hf_image_rows(model, processor, records, method, budget):
    """The image rows of the LLM's input under ``vtc.apply`` (the Hugging Face path), per record."""
    import vtc

    rows = []
    start = None

    def grab(module, args, kwargs):
        rows.append(kwargs["inputs_embeds"][0].detach().clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtc.compressed(model, method, budget=budget) if method else contextlib.nullcontext():
            for r in records:
                inputs = processor(images=[r.image], text=[toy.prompt(processor, r.question)], return_tensors="pt")
                ids = inputs["input_ids"][0]
                start = int((ids == model.config.image_token_id).nonzero()[0, 0])
                text = ids.numel() - int((ids == model.config.image_token_id).sum())
                with torch.no_grad():
                    model(**inputs)
                k = rows[-1].shape[0] - text
                rows[-1] = rows[-1][start : start + k]
    finally:
        handle.remove()
    return rows


def core_image_rows(model, processor, records, method, budget):
    """The same rows from vtc.serve.core (what the vLLM plugin runs), on the model's own tower."""
    from vtc.serve.core import reduce_image, serve_plan, tower_signals

    sp = serve_plan(model.config, method, budget)
    tower = model.model.vision_tower
    captured, handles = {}, []
    for i in sp.tower_layers:
        attn = tower.encoder.layers[i].self_attn

        def hook(module, args, kwargs, i=i):
            captured[i] = (module, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    pixels = processor.image_processor([r.image for r in records], return_tensors="pt")["pixel_values"]
    try:
        with torch.no_grad():
            out = tower(pixels, output_hidden_states=True)
            full = out.hidden_states[model.config.vision_feature_layer]
            feats = model.model.multi_modal_projector(full[:, 1:])
            signals = tower_signals(sp, captured, full, model.config.vision_config.num_attention_heads)
            return [reduce_image(sp, feats[b], {k: v[b] for k, v in signals.items()},
                                 project=model.model.multi_modal_projector)[0] for b in range(len(records))]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(("method", "budget"), PRE_LLM)
def test_core_reduces_as_the_hf_path(toy_model, method, budget):
    """vtc.serve.core, fed the tower's attention inputs, gives the LLM the rows vtc.apply gives it."""
    model, processor = toy_model
    records = toy.generate(3, seed=5)
    expected = hf_image_rows(model, processor, records, method, budget)
    got = core_image_rows(model, processor, records, method, budget)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape == (round(144 * budget), 128)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fastv", "pdrop", "tome"])
def test_serve_plan_refuses_what_paged_attention_cannot_run(toy_model, method):
    from vtc.errors import UnsupportedConfigurationError
    from vtc.serve.core import serve_plan

    with pytest.raises(UnsupportedConfigurationError, match="inside the LLM|inside the vision tower"):
        serve_plan(toy_model[0].config, method, 1 / 3)
