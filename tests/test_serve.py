"""Serving vtc with vLLM (docs/serving.md): the toy checkpoint's hub layout here; the plugin's
tests, which need scripts/setup_serve.sh's venv, follow."""

from __future__ import annotations

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
