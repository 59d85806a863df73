"""vtc off the single-turn path (issue 13): right-padded batches, assisted decoding, chats
continued over the returned cache, deepcopy, threads, refusals and accelerate's offload."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import vtc
from vtc.errors import UnsupportedConfigurationError
from vtc.testing import tiny_inputs, tiny_model

from .conftest import greedy

torch.set_num_threads(1)

IN_LLM = {"fastv": {"budget": 8}, "pdrop": {"budget": 8}, "aim": {"budget": 6}}
# Pre-LLM methods (AIM's merge stage alone: slope 0 keeps every merged token in the LLM).
PRE_LLM = {
    "vtc_cls": {"budget": 6}, "vtc_cls-keep": {"budget": 6, "positions": "keep"}, "visionzip": {"budget": 6},
    "tome": {"budget": 6}, "merge": {"budget": 6}, "random": {"budget": 5, "seed": 3}, "pool": {"budget": 4},
    "aim-merge": {"merged": 6, "slope": 0.0},
}


def _method(case: str) -> str:
    return case.split("-")[0]


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


@pytest.fixture(scope="module")
def llava_eager():
    return tiny_model("llava", attn="eager")


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    for name in ("llava", "llava_eager"):
        if name in request.fixturenames:
            m = request.getfixturevalue(name)
            if vtc.is_applied(m):
                vtc.remove(m)


# -- 4. right-padded batches --------------------------------------------------------------
def _right_padded(model, pad):
    """A batch padded on the right: the left-padded batch with each row's real tokens moved first."""
    inp = tiny_inputs(model, batch=len(pad), pad=pad)
    ids, mask = inp["input_ids"].clone(), inp["attention_mask"].clone()
    for b, p in enumerate(pad):
        ids[b], mask[b] = ids[b].roll(-p), mask[b].roll(-p)
    return inp, {**inp, "input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("method", ["fastv", "pdrop", "aim"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_right_padding_queries_last_real_token(llava, llava_eager, method, attn):
    """Each sample of a right-padded batch is scored with its last real prompt token as the query:
    its next-token logits equal the sample run alone."""
    model = llava if attn == "sdpa" else llava_eager
    pad = [0, 3]
    _, right = _right_padded(model, pad)
    with vtc.compressed(model, method, **IN_LLM[method]):
        logits = model(**right).logits
        n = logits.shape[1]
        for b, p in enumerate(pad):
            real = right["attention_mask"][b].bool()
            alone = {"input_ids": right["input_ids"][b : b + 1, real],
                     "attention_mask": right["attention_mask"][b : b + 1, real],
                     "pixel_values": right["pixel_values"][b : b + 1]}
            expected = model(**alone).logits[0, -1]
            torch.testing.assert_close(logits[b, n - p - 1], expected, atol=1e-4, rtol=1e-4)


def test_query_attention_per_sample_index():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from vtc.ops import query_attention

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    layer, h = LlamaDecoderLayer(cfg, 0), torch.randn(2, 7, 32)
    rope = LlamaRotaryEmbedding(cfg)(h, torch.arange(7)[None])
    both = query_attention(layer, h, rope, query_index=torch.tensor([6, 3]))
    torch.testing.assert_close(both[0], query_attention(layer, h[:1], rope, query_index=6)[0])
    torch.testing.assert_close(both[1], query_attention(layer, h[1:], rope, query_index=3)[0])


# -- 3. assisted decoding ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "pdrop", "aim", "vtc_cls", "vtc_cls+pdrop"])
@pytest.mark.parametrize("draft", ["same", "other", "self", "patched"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_assisted_decoding_equals_greedy(llava, llava_eager, method, draft, attn):
    """Drafts are verified in the prefill: they are never the query of in-LLM scoring nor scored, the
    cache is cropped to the accepted drafts (per layer, each its own length; a materialized mask
    re-indexed to the prompt's survivors), and the result equals plain greedy decoding."""
    llava = llava if attn == "sdpa" else llava_eager
    params = IN_LLM.get(method, {"budget": 6})
    if draft == "same":  # drafts accepted
        assistant, inputs = copy.deepcopy(llava), tiny_inputs(llava)
    elif draft == "other":  # six drafts a round, mostly rejected (the cache cropped), and a padded prompt
        assistant, inputs = tiny_model("llava", seed=1, attn=attn), tiny_inputs(llava, pad=[2])
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.num_assistant_tokens = 6
    elif draft == "self":  # the patched instance drafts for itself (nested generate calls)
        assistant, inputs = llava, tiny_inputs(llava, pad=[2])
    else:  # another model patched with the same method
        assistant, inputs = vtc.apply(tiny_model("llava", seed=1, attn=attn), method, **params), tiny_inputs(llava)
    with vtc.compressed(llava, method, **params):
        plain, plain_logits = greedy(llava, inputs, steps=8)
        kept = vtc.stats(llava).kept
        assisted, _ = greedy(llava, inputs, steps=8, assistant_model=assistant)
        assert torch.equal(assisted, plain)
        # The prefill (prompt + drafts) pruned exactly what plain greedy pruned.
        assert all(torch.equal(a, b) for k in kept for a, b in zip(vtc.stats(llava).kept[k], kept[k]))


@pytest.mark.parametrize("method", ["fastv", "pdrop", "aim"])
def test_generate_without_cache_equals_cached(llava, method):
    """use_cache=False: every step is a prefill of the prompt and the tokens generated so far; they
    are scored like drafts (never the query), so the pruning and the answer are the cached run's."""
    inputs = tiny_inputs(llava, batch=2, pad=[0, 2])
    with vtc.compressed(llava, method, **IN_LLM[method]):
        cached = greedy(llava, inputs, steps=6)
        uncached = greedy(llava, inputs, steps=6, use_cache=False)
    assert torch.equal(uncached[0], cached[0])
    torch.testing.assert_close(uncached[1], cached[1], atol=1e-5, rtol=1e-5)


# -- 1. chats continued over the returned cache --------------------------------------------
def _conversation(model, inputs, first):
    turn2 = torch.randint(3, 100, (inputs["input_ids"].shape[0], 5), generator=torch.Generator().manual_seed(1))
    conv = torch.cat([first, turn2], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(conv.shape[0], conv.shape[1] - inputs["attention_mask"]
                                                           .shape[1], dtype=torch.long)], dim=1)
    return conv, mask


def _generate(model, **kw):
    out = model.generate(**kw, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("case", sorted(PRE_LLM))
@pytest.mark.parametrize("batch", [1, 2])
def test_chat_over_pruned_cache_equals_fresh_run(llava, case, batch):
    """Pre-LLM methods: turn 2 over the cache of turn 1 equals a fresh run of the whole conversation
    (its image reduced the same way): the ids generate re-feeds for the reduced rows are cut."""
    inputs = tiny_inputs(llava, batch=batch, pad=[0, 2][:batch])
    with vtc.compressed(llava, _method(case), **PRE_LLM[case]):
        first, _ = _generate(llava, **inputs)
        conv, mask = _conversation(llava, inputs, first.sequences)
        continued, logits = _generate(llava, input_ids=conv, attention_mask=mask, cache=first.cache)
        fresh, fresh_logits = _generate(llava, input_ids=conv, attention_mask=mask,
                                        pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(logits, fresh_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(continued.sequences, fresh.sequences)


def test_chat_over_pruned_cache_without_mask(llava):
    """The same with no attention mask (generate drops an all-ones mask: the new ids are found by
    their positions), and a third turn."""
    inputs = {k: v for k, v in tiny_inputs(llava).items() if k != "attention_mask"}
    with vtc.compressed(llava, "vtc_cls", budget=6):
        first, _ = _generate(llava, **inputs)
        conv = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], dim=1)
        second, _ = _generate(llava, input_ids=conv, cache=first.cache)
        conv3 = torch.cat([second.sequences, torch.tensor([[8, 9]])], dim=1)
        third, logits = _generate(llava, input_ids=conv3, cache=second.cache)
        fresh, fresh_logits = _generate(llava, input_ids=conv3, pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(logits, fresh_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(third.sequences, fresh.sequences)


def test_chat_over_pruned_cache_new_ids_only(llava):
    """Only the new turn's ids with the whole conversation's mask (generate does not slice then)."""
    inputs = tiny_inputs(llava)
    with vtc.compressed(llava, "visionzip", budget=6):
        first, _ = _generate(llava, **inputs)
        conv, mask = _conversation(llava, inputs, first.sequences)
        new = conv[:, first.sequences.shape[1] - 1 :]
        _, logits = _generate(llava, input_ids=new, attention_mask=mask, cache=first.cache)
        _, fresh_logits = _generate(llava, input_ids=conv, attention_mask=mask, pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(logits, fresh_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_prompt_lookup_decoding_equals_greedy(llava, method):
    """Prompt lookup drafts from the prompt (its last two tokens repeat an earlier pair)."""
    inputs = tiny_inputs(llava)
    inputs["input_ids"][0, -2:] = inputs["input_ids"][0, -6:-4]
    with vtc.compressed(llava, method, **IN_LLM[method]):
        plain, _ = greedy(llava, inputs, steps=8)
        lookup, _ = greedy(llava, inputs, steps=8, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, plain)


@pytest.mark.parametrize("method", sorted(IN_LLM))
def test_chat_over_pruned_cache_in_llm_keeps_first_turn_pruning(llava, method):
    """In-LLM methods: turn 2 runs over the first turn's pruned cache (no re-pruning: the query of
    turn 1 chose the survivors); it equals feeding the new tokens one decode step at a time."""
    inputs = tiny_inputs(llava)
    with vtc.compressed(llava, method, **IN_LLM[method]):
        first, _ = _generate(llava, **inputs)
        kept = vtc.stats(llava).kept
        conv, mask = _conversation(llava, inputs, first.sequences)
        cache = copy.deepcopy(first.cache)
        continued, logits = _generate(llava, input_ids=conv, attention_mask=mask, cache=first.cache)
        start = first.sequences.shape[1] - 1  # the cache holds all but the last generated token
        for t in range(start, conv.shape[1]):
            step = llava(input_ids=conv[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
        assert vtc.stats(llava).kept.keys() == kept.keys()
    torch.testing.assert_close(logits[:, 0], step.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_image_after_cached_prefix_is_refused(llava):
    """Prefix caching: a text-only prefix in the cache, then a prompt with an image: a clear refusal."""
    inputs = tiny_inputs(llava)
    ids = inputs["input_ids"]
    image = int((ids[0] == llava.config.image_token_id).nonzero()[0, 0])
    with vtc.compressed(llava, "vtc_cls", budget=6):
        prefix = llava(input_ids=ids[:, :image], use_cache=True).cache
        with pytest.raises(UnsupportedConfigurationError, match="prefix caching"):
            llava.generate(**inputs, cache=prefix, max_new_tokens=2, do_sample=False, pad_token_id=0)


# -- 6. deepcopy ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "tome", "vtc_cls+pdrop"])
def test_deepcopy_is_independently_patched(llava, method):
    inputs = tiny_inputs(llava)
    params = IN_LLM.get(method, {"budget": 6})
    reference = copy.deepcopy(llava)  # unpatched
    with torch.no_grad():
        reference.model.language_model.layers[0].mlp.down_proj.weight.mul_(0.5)
    with vtc.compressed(reference, method, **params):
        expected = reference(**inputs).logits
    vtc.apply(llava, method, **params)
    before = llava(**inputs).logits
    clone = copy.deepcopy(llava)
    assert vtc.is_applied(clone) and clone.__dict__[vtc.api.ATTR].base is clone.model
    with torch.no_grad():
        clone.model.language_model.layers[0].mlp.down_proj.weight.mul_(0.5)
    torch.testing.assert_close(clone(**inputs).logits, expected)  # the copy runs its own weights, patched
    torch.testing.assert_close(llava(**inputs).logits, before)
    vtc.remove(clone)
    with torch.no_grad():
        clone.model.language_model.layers[0].mlp.down_proj.weight.mul_(2.0)
    plain = copy.deepcopy(clone)
    torch.testing.assert_close(llava(**inputs).logits, before)  # the original still patched
    assert clone(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]  # the copy unpatched
    assert not plain._forward_pre_hooks and "forward" not in plain.model.__dict__
    assert "forward" not in clone.model.__dict__ and "generate" not in clone.__dict__
    assert all("forward" not in layer.__dict__ for layer in clone.model.vision_tower.encoder.layers)


# -- 5. threads -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vtc_cls+pdrop", "fastv", "tome", "aim"])
def test_two_threads_share_one_patched_instance(llava, method):
    """Per-call state is per thread and on the cache: concurrent calls get their own answers."""
    params = IN_LLM.get(method, {"budget": 6})
    prompts = [tiny_inputs(llava, seed=s, batch=b, pad=[0, 1][:b]) for s, b in ((0, 1), (5, 2), (7, 1))]
    with vtc.compressed(llava, method, **params):
        expected = [greedy(llava, p, steps=4) for p in prompts]
        results, errors = {}, []

        def work(i):
            try:
                for r in range(3):
                    results[i, r] = greedy(llava, prompts[i], steps=4)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for (i, _), (seq, logits) in results.items():
        assert torch.equal(seq, expected[i][0])
        torch.testing.assert_close(logits, expected[i][1])


# -- 7. refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["vtc_cls", "fastv", "vtc_cls+pdrop", "merge"])
def test_training_forward_gathers_labels_with_survivors(llava, case):
    """Fine-tuning under compression: labels are gathered to the surviving rows, so the loss is the
    model's own shifted cross-entropy over them (text rows all survive, image rows are labelled
    -100), and it has gradients."""
    inputs = tiny_inputs(llava, batch=2, pad=[0, 2])
    ids = inputs["input_ids"]
    labels = ids.masked_fill((ids == llava.config.image_token_id) | (inputs["attention_mask"] == 0), -100)
    params = IN_LLM.get(case, {"budget": 6})
    with vtc.compressed(llava, case, **params):
        out = llava(**inputs, labels=labels)
        logits = llava(**inputs).logits
    # Independently: the surviving rows are the text rows and some image rows (-100), in order.
    text = labels != -100
    n_image = int((ids[0] == llava.config.image_token_id).sum())
    keep = logits.shape[1] - (ids.shape[1] - n_image)  # image rows in the last layer (pads kept)
    expected = []
    for b in range(ids.shape[0]):
        image = (ids[b] == llava.config.image_token_id).nonzero()[:, 0]
        row = torch.cat([labels[b, : image[0]], torch.full((keep,), -100), labels[b, image[-1] + 1 :]])
        expected.append(row)
    expected = torch.stack(expected)
    assert int((expected != -100).sum()) == int(text.sum())
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  expected[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, reference)
    out.loss.backward()
    assert llava.lm_head.weight.grad is not None
    llava.zero_grad(set_to_none=True)


def test_chunked_prefill_is_refused(llava):
    with vtc.compressed(llava, "fastv", budget=8), pytest.raises(UnsupportedConfigurationError,
                                                                 match="prefill_chunk_size"):
        llava.generate(**tiny_inputs(llava), prefill_chunk_size=4, max_new_tokens=2)


def test_apply_to_compiled_model_is_refused(llava):
    compiled = torch.compile(llava)
    with pytest.raises(UnsupportedConfigurationError, match="apply vtc first, then compile"):
        vtc.apply(compiled, "fastv", budget=8)
    assert not vtc.is_applied(llava)


# -- 2. accelerate offload ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vtc_cls", "tome", "visionzip", "fastv"])
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_model_equals_in_memory(method, offload, tmp_path):
    """[CLS] scores survive accelerate's device hooks (which hand over a copy of the encoder output)."""
    accelerate = pytest.importorskip("accelerate")
    params = IN_LLM.get(method, {"budget": 6})
    inputs = tiny_inputs(tiny_model("llava"), batch=2, pad=[0, 2])
    model = tiny_model("llava")
    with vtc.compressed(model, method, **params):
        expected = greedy(model, inputs, steps=4)
    offloaded = tiny_model("llava")
    if offload == "cpu":
        offloaded = accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    else:
        device_map = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
                      "model.language_model": "disk", "lm_head": "cpu"}
        offloaded = accelerate.dispatch_model(offloaded, device_map=device_map, offload_dir=str(tmp_path),
                                              main_device="cpu", force_hooks=True)
    with vtc.compressed(offloaded, method, **params):
        seq, logits = greedy(offloaded, inputs, steps=4)
    assert torch.equal(seq, expected[0])
    torch.testing.assert_close(logits, expected[1])


@pytest.mark.parametrize("method", ["vtc_cls", "tome"])
def test_from_pretrained_with_device_map_offload(method, tmp_path):
    """The load flag with a device_map that offloads the tower and the language model to disk."""
    pytest.importorskip("accelerate")
    model = tiny_model("llava")
    model.save_pretrained(tmp_path / "m")
    inputs = tiny_inputs(model)
    with vtc.compressed(model, method, budget=6):
        expected = greedy(model, inputs, steps=4)
    device_map = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
                  "model.language_model": "disk", "lm_head": "cpu"}
    loaded = vtc.from_pretrained(str(tmp_path / "m"), method=method, budget=6, device_map=device_map,
                                 offload_folder=str(tmp_path / "offload"))
    assert getattr(loaded, "hf_device_map", None)
    seq, logits = greedy(loaded, inputs, steps=4)
    assert torch.equal(seq, expected[0])
    torch.testing.assert_close(logits, expected[1])


# -- the tiled families ---------------------------------------------------------------------
@pytest.mark.parametrize(("family", "method"), [("llava_next", "vtc_cls"), ("llava_next", "merge"),
                                               ("llava_next", "hired"), ("internvl", "vtc_cls"),
                                               ("internvl", "merge"), ("internvl", "visionzip")])
def test_tiled_families_chat_over_pruned_cache(family, method):
    """Images of different sizes in one batch (samples shortened unequally, padding slots in the
    cache): a continued chat equals a fresh run of the whole conversation."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, batch=2, pad=[0, 2])
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    params = {"alpha": 0.25, "early": 1} if method == "hired" else {}
    with vtc.compressed(model, method, budget=0.4, **params):
        first, _ = _generate(model, **inputs)
        conv, mask = _conversation(model, inputs, first.sequences)
        continued, logits = _generate(model, input_ids=conv, attention_mask=mask, cache=first.cache)
        fresh, fresh_logits = _generate(model, input_ids=conv, attention_mask=mask, **images)
    torch.testing.assert_close(logits, fresh_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(continued.sequences, fresh.sequences)


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
@pytest.mark.parametrize("method", ["fastv", "vtc_cls+pdrop"])
def test_tiled_families_right_padding(family, method):
    from vtc.testing import split_inputs

    model = tiny_model(family)
    _, right = _right_padded(model, [0, 2])
    alone = split_inputs(model, right)
    with vtc.compressed(model, method, budget=0.5):
        logits = model(**right).logits
        n = logits.shape[1]
        for b, p in enumerate([0, 2]):
            torch.testing.assert_close(logits[b, n - p - 1], model(**alone[b]).logits[0, -1], atol=1e-4, rtol=1e-4)
