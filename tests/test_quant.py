"""Scoring calls the layers' own modules, so bitsandbytes-quantized models work (on CPU too)."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.testing import tiny_inputs, tiny_llava

from .test_equivalence import _check_against_reference

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from transformers import BitsAndBytesConfig

    path = tmp_path_factory.mktemp("tiny-llava")
    # Every quantized layer at least 64 wide: the CPU kernels of AVX512-BF16 machines pack 64-blocks.
    tiny_llava(hidden=128, intermediate=256, vision_hidden=64).save_pretrained(path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return vtc.from_pretrained(str(path), quantization_config=config, device_map="cpu")


def test_4bit_model_is_quantized(quantized):
    assert type(quantized.model.language_model.layers[1].self_attn.q_proj).__name__ == "Linear4bit"


@pytest.mark.parametrize("case", ["fastv", "vtc_cls"])
def test_4bit_drop_equals_mask(quantized, case):
    _check_against_reference(quantized, tiny_inputs(quantized), case)


def test_4bit_generate_keeps_fewer_tokens_in_cache(quantized):
    inputs = tiny_inputs(quantized)
    with vtc.compressed(quantized, "fastv", budget=8):
        out = quantized.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        lengths = [layer.keys.shape[2] for layer in out.cache.layers]
    prompt = inputs["input_ids"].shape[1]
    dropped = 16 - vtc.plan(quantized, "fastv", budget=8).stages[0].keep
    assert lengths[:2] == [prompt + 2] * 2  # the last generated token is not in the cache yet
    assert lengths[2:] == [prompt + 2 - dropped] * 4
