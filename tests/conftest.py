from __future__ import annotations

import functools

import pytest
import torch

import vtc
from vtc.testing import tiny_inputs, tiny_model

torch.set_num_threads(1)

# (attention implementation, language model[, family]): both attention paths, a Qwen2 LM
# (biased q/k/v), and the tiled families, whose images differ in size within a batch.
BACKENDS = [("sdpa", "llama"), ("eager", "llama"), ("sdpa", "qwen2")]
FAMILIES = [("sdpa", "llama", "llava_next"), ("sdpa", "qwen2", "internvl"), ("eager", "llama", "internvl"),
            ("sdpa", "qwen2", "qwen2_5_vl"), ("eager", "qwen2", "qwen2_5_vl"),
            ("sdpa", "qwen3", "qwen3_vl"), ("eager", "qwen3", "qwen3_vl"),
            ("sdpa", "qwen2", "llava_onevision"), ("eager", "qwen2", "llava_onevision")]
# Families whose images differ in size (cases count tokens as fractions of each image).
TILED = ("llava_next", "internvl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
# Methods a family's tower cannot serve (no [CLS] token, no square grid, no tiles' regions).
NO_CLS = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")
# Cases of the shared matrix: (method, parameters) at budgets that reduce tokens on the tiny
# model (16 tokens per image, 6 layers), plus position-policy variants.
METHODS = {
    "fastv": ("fastv", {"budget": 8}),
    "fastv-compact": ("fastv", {"budget": 10, "positions": "compact", "layer": 3}),
    "dart": ("dart", {"budget": 10, "pivot_image": 2, "pivot_text": 2}),
    "sparsevlm": ("sparsevlm", {"budget": 8, "recycle": False}),
    "sparsevlm-recycle": ("sparsevlm", {"budget": 8}),  # merges inside the LLM: see MERGES_IN_LLM
    "vtc_cls": ("vtc_cls", {"budget": 6}),
    "vtc_cls-keep": ("vtc_cls", {"budget": 6, "positions": "keep", "layers": (1,)}),
    "random": ("random", {"budget": 5, "seed": 3}),
    "pdrop": ("pdrop", {"budget": 8}),
    "pool": ("pool", {"budget": 4}),
    "tome": ("tome", {"budget": 6}),  # LLaVA-1.5 only (merges inside the tower)
    "merge": ("merge", {"budget": 6}),
    "divprune": ("divprune", {"budget": 6}),
    "vispruner": ("vispruner", {"budget": 6}),
    "cdpruner": ("cdpruner", {"budget": 6}),
    "downsample": ("downsample", {"budget": 6}),  # LLaVA-1.5 and the Qwen families (resizable towers)
    "visionzip": ("visionzip", {"budget": 6}),
    "aim": ("aim", {"budget": 6}),
    "aim-no-merge": ("aim", {"merged": 16, "slope": 0.4, "iters": 3, "temperature": 0.5}),
    "schedule": ("schedule", {"schedule": {"fractions": [1, 0.75, 0.75, 0.5, 0.25, 0]}}),
    "gsearch": ("gsearch", {"schedule": {"counts": [16, 10, 10, 10, 3, 3]}}),
    "psigmoid": ("psigmoid", {"budget": 7, "r_min": 0.1, "slope": 2.0}),
    "pdrop-keep-positions": ("pdrop", {"ratio": 0.6, "layers": (2, 4), "positions": "keep"}),
    "vtc_cls+pdrop": ("vtc_cls+pdrop", {"budget": 6}),
    "hired": ("hired", {"budget": 6, "alpha": 0.25, "early": 1}),  # LLaVA-NeXT only
    "random+fastv": (["random", "fastv"], {"budget": 7, "fastv.layer": 1, "seed": 2}),
    "dycoke": ("dycoke", {"budget": 8}),  # video only: images pass unchanged (tests/test_dycoke.py)
}

# Cases that merge tokens inside the LLM: no attention mask over the prompt's rows reproduces them, so the
# matrix's drop == mask and mask-based recomputation tests skip them; tests/test_sparsevlm.py checks them
# against a reference of the official rule instead (prefill and cached decode steps).
MERGES_IN_LLM = ("sparsevlm-recycle",)


def method_cases() -> list[str]:
    """Every registered method must have a case: a new method cannot skip the matrix."""
    missing = set(vtc.list_methods()) - {m for m, _ in METHODS.values() if isinstance(m, str)}
    assert not missing, f"add test settings for {missing} to METHODS in tests/conftest.py"
    return sorted(METHODS)


def applies(backend: tuple, case: str) -> bool:
    """Whether a case's method runs on a backend's family: ``pool`` needs a square token grid
    (not tiled images), ``tome`` a tower whose tokens are the features (not tiled images),
    ``hired`` LLaVA-NeXT's tile regions; Qwen's towers have no [CLS] token and its positions are
    3-D (kept), and each of its images is one grid (``pool`` applies). The refusals are tested in
    tests/test_families.py and tests/test_tome.py."""
    family = backend[2] if len(backend) > 2 else "llava"
    method = METHODS[case][0]
    names = method if isinstance(method, list) else method.split("+")
    if "dycoke" in names:
        return False  # prunes a video's frames; the matrix's prompts hold images (tests/test_dycoke.py)
    if "downsample" in names and family not in ("llava", "qwen2_5_vl", "qwen3_vl"):
        return False  # fixed-size tiles chosen by the processor (tests/test_downsample.py)
    untiled = ("pool", "tome")
    if family == "llava_onevision":
        # No [CLS] (visionzip scores by received attention), anyres images (pool: videos only, see
        # tests/test_llava_onevision.py), 1-D positions (compact ones too).
        return not set(names) & {"vtc_cls", "hired", "pool", "tome"}
    if family in NO_CLS:
        # Qwen keeps 3-D positions and refuses compact ones at layer stages (tests/test_qwen2_5_vl.py); pool
        # pools each image's own grid there.
        cls = {"vtc_cls", "hired"}  # visionzip scores by the attention patches receive there
        return not (set(names) & (cls | {"tome"})) and METHODS[case][1].get("positions") != "compact"
    return not (set(names) & set(untiled) and family in TILED) and not ("hired" in names and family != "llava_next")


def case_args(model, case: str) -> tuple:
    """``(method, params)`` of a case for ``model``. The cases count tokens of the 16-token
    LLaVA images; on a tiled family (images of 32 to 88 tokens, a nominal image larger still)
    counts become the same fractions of each image."""
    method, params = METHODS[case]
    if model.config.model_type not in TILED:
        return method, params
    n = 16  # tokens of a tiny LLaVA image
    params = {k: v / n if k in ("budget", "keep", "merged") and isinstance(v, int) else v for k, v in params.items()}
    if "counts" in params.get("schedule", {}):
        params["schedule"] = {"fractions": [c / n for c in params["schedule"]["counts"]]}
    return method, params


def case_kwargs(model, case: str) -> dict:
    """The case as keyword arguments of ``vtc.apply``, ``vtc.compressed`` and ``vtc.plan``."""
    method, params = case_args(model, case)
    return {"method": method, **params}


@functools.cache
def _model(attn: str, text_model: str = "llama", family: str = "llava"):
    return tiny_model(family, attn=attn, text_model=text_model)


def use_model(request):
    m = _model(*request.param)
    yield m
    if vtc.is_applied(m):
        vtc.remove(m)


@pytest.fixture(params=BACKENDS, ids=lambda b: "-".join(b))
def model(request):
    """A tiny LLaVA on each backend (tests/test_equivalence.py adds the other families)."""
    yield from use_model(request)


@pytest.fixture
def inputs(model):
    return tiny_inputs(model)


def greedy(model, inputs, steps=5, **kw):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0, **kw,
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


@pytest.fixture(scope="session")
def toy_shaped(tmp_path_factory):
    """A random-weight model with the toy model's shape and processor (144 tokens, 4 layers), saved."""
    from transformers import LlavaForConditionalGeneration

    from vtc.eval.toy.build import build_config, build_processor

    path = tmp_path_factory.mktemp("toy-shaped")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(build_config(vision_layers=2, vision_width=32, text_layers=4,
                                               text_width=32)).save_pretrained(path)
    build_processor().save_pretrained(path)
    return str(path)
