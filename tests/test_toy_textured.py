"""Toy v3's scene style ``textured`` (eval/toy/scenes.py) and the training options that use it
(scripts/train_toy.py ``--scene-style``, ``--background-align``, ``--text-layers 16``)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random

import numpy as np
import pytest
import torch

from vtc.eval import toy
from vtc.eval.toy import build, scenes

from .test_toy import _train_script

# Recorded with the code before the style option existed (commit 4b092f2): sha256 of the 50
# images' bytes and their pixel sum, for generate(50, seed) at default settings.
FLAT_IMAGES = {
    7: ("e1ec9e03b15a8a7887698d0d1a258ca77fe6c96f6543f4e710756430a242268f", 903637497),
    31337: ("bff3f2591ab3fb16d7217c5b558dae5a08dfb8cfc763fe0447022974e3608845", 899945127),
}
# generate(20, seed=11, kinds=ALL_KINDS, sizes=(168, 224)): images and questions, same commit.
FLAT_MIXED = "31348108512cdc6472f42e3f3af509cd08e44690b1d5e7c0b3902afc4d9ab15f"


@pytest.mark.parametrize("seed", sorted(FLAT_IMAGES))
def test_default_rendering_is_unchanged(seed):
    recs = toy.generate(50, seed=seed)
    digest = hashlib.sha256(b"".join(np.asarray(r.image).tobytes() for r in recs)).hexdigest()
    total = sum(int(np.asarray(r.image, dtype=np.int64).sum()) for r in recs)
    assert (digest, total) == FLAT_IMAGES[seed]
    assert all(r.scene.style == "flat" and not r.scene.marks for r in recs)


def test_default_questions_and_sizes_are_unchanged():
    h = hashlib.sha256()
    for r in toy.generate(20, seed=11, kinds=toy.ALL_KINDS, sizes=(168, 224)):
        h.update(np.asarray(r.image).tobytes())
        h.update(r.question.encode())
    assert h.hexdigest() == FLAT_MIXED


def test_scenes_pickled_before_the_style_fields_load_as_flat():
    """Training caches pickle Scene objects: one without the new fields renders as before."""
    scene = toy.generate(1, seed=7)[0].scene
    old = object.__new__(scenes.Scene)
    for name in ("background", "objects", "noise_seed", "size"):
        object.__setattr__(old, name, getattr(scene, name))
    assert old.style == "flat" and old.marks == () and old == scene
    assert np.array_equal(np.asarray(scenes.render(old)), np.asarray(scenes.render(scene)))


@pytest.fixture(scope="module")
def textured() -> list[scenes.Record]:
    return toy.generate(60, seed=11, kinds=toy.ALL_KINDS, style="textured")


def test_textured_is_deterministic_and_renders_from_the_scene(textured):
    again = toy.generate(60, seed=11, kinds=toy.ALL_KINDS, style="textured")
    for a, b in zip(textured, again, strict=True):
        assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(np.asarray(scenes.render(a.scene)), np.asarray(a.image))
    assert {r.scene.style for r in textured} == {"textured"}
    assert {layer.kind for r in textured for layer in r.scene.texture} == set(scenes.TEXTURES)
    assert all(r.scene.noise_sigma >= 6 for r in textured)  # well above the flat style's 3
    assert {len(r.scene.marks) for r in textured} == {0, 1, 2, 3}
    flat = toy.generate(60, seed=11, kinds=toy.ALL_KINDS)
    assert not any(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(flat, textured))


def test_textured_backgrounds_vary_and_stay_pale(textured):
    bg = np.array([r.scene.background for r in textured], dtype=float)
    assert bg.std(0).min() > 5  # varied hues, not four fixed greys
    for r in textured:
        for tone in (r.scene.background, r.scene.tone):
            assert min(math.dist(tone, c) for c in scenes.COLORS.values()) >= 100
        # The texture is visible: background pixels vary far more than the flat style's noise.
        arr = np.asarray(r.image).astype(float)
        back = scenes.object_index_map(r.scene) == 0
        assert arr[back].std(0).max() > 5


def test_textured_objects_keep_unambiguous_colors(textured):
    """Each object's color is recomputable from the pixels at its center, and no background patch
    looks like an object color."""
    palette = np.array([scenes.COLORS[c] for c in scenes.COLOR_NAMES], dtype=float)
    for r in textured:
        arr = np.asarray(r.image).astype(float)
        for o in r.scene.objects:
            cx, cy = (int(v) for v in o.center)
            pixel = np.median(arr[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3), 0)
            assert np.abs(pixel - np.array(scenes.COLORS[o.color])).max() < 40, (o, pixel)
            assert scenes.COLOR_NAMES[np.linalg.norm(palette - pixel, axis=1).argmin()] == o.color
        colors, _ = scenes.patch_labels(r.scene)
        patches = arr.reshape(12, 14, 12, 14, 3).transpose(0, 2, 1, 3, 4).reshape(144, -1, 3)
        means = patches[colors == 0].mean(1)
        assert np.linalg.norm(means[:, None] - palette[None], axis=-1).min() > 60


def test_distractor_marks_are_background(textured):
    objects_colors = np.array(list(scenes.COLORS.values()), dtype=float)
    n_marks = 0
    for r in textured:
        bare = dataclasses.replace(r.scene, marks=())
        for got, want in zip(scenes.patch_labels(r.scene), scenes.patch_labels(bare), strict=True):
            assert np.array_equal(got, want)
        assert np.array_equal(scenes.asked_tokens(r), scenes.asked_tokens(dataclasses.replace(r, scene=bare)))
        for m in r.scene.marks:
            n_marks += 1
            assert m.color not in scenes.COLOR_NAMES and m.color not in scenes.SHAPES
            assert np.linalg.norm(objects_colors - np.array(scenes.MARK_COLORS[m.color]), axis=1).min() >= 90
            x0, y0, x1, y1 = m.bbox
            assert max(x1 - x0, y1 - y0) <= 16
            assert not scenes.object_index_map(r.scene)[y0:y1, x0:x1].any()  # never on an object
        # Marks are drawn: the image differs from the same scene without them only inside their boxes.
        diff = np.abs(np.asarray(r.image).astype(int) - np.asarray(scenes.render(bare)).astype(int)).max(-1) > 0
        inside = np.zeros_like(diff)
        for m in r.scene.marks:
            inside[m.bbox[1] : m.bbox[3], m.bbox[0] : m.bbox[2]] = True
        assert not (diff & ~inside).any() and (diff.any() == bool(r.scene.marks))
    assert n_marks > 30


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="unknown scene style 'busy'"):
        toy.generate(1, seed=0, style="busy")


# ------------------------------------------------------------------------ train_toy.py


V3 = ["--scene-style", "textured", "--background-align", "none", "--text-layers", "16"]


def test_v3_options_default_to_the_shipped_toy(tmp_path):
    train = _train_script()
    args = train.parse_args([])
    assert (args.scene_style, args.background_align, args.text_layers) == ("flat", "word", 8)
    assert train.layout(args).style == "flat"
    v3 = train.parse_args([*V3, "--model-dir", str(tmp_path / "model-v3")])
    assert train.layout(v3).style == "textured"
    train.check_model_dir(v3)
    with pytest.raises(SystemExit, match="shipped toy"):
        train.check_model_dir(train.parse_args(V3))  # default --model-dir: eval/toy/model


def test_stage1_batches_render_the_chosen_style():
    train = _train_script()
    args = train.parse_args(V3)
    x, colors, shapes, pairs = train.layout(args).stage1_batch(random.Random(0), 4)
    scs = [scenes.make_scene(random.Random(0), style="textured")]
    assert torch.allclose(x[:1], train.pixels([scenes.render(scs[0])]))
    assert torch.equal(shapes[0], torch.from_numpy(scenes.patch_labels(scs[0])[1]))
    flat, *_ = train.layout(train.parse_args([])).stage1_batch(random.Random(0), 4)
    assert not torch.allclose(x, flat)


def _v3_batch(train, n: int = 3):
    rng = random.Random(0)
    scs = [scenes.make_scene(rng, style="textured") for _ in range(n)]
    labels = [scenes.patch_labels(sc) for sc in scs]
    cache = {
        "feats": torch.randn(n, 145, 32, generator=torch.Generator().manual_seed(0)),
        "colors": torch.from_numpy(np.stack([c for c, _ in labels])),
        "shapes": torch.from_numpy(np.stack([s for _, s in labels])),
        "scenes": scs,
    }
    vocab = train.Vocab(build.build_processor().tokenizer)
    return vocab, train.make_batch(vocab, cache, list(range(n)), rng, 2, train.KIND_WEIGHTS)


@pytest.mark.parametrize("background", ["word", "none"])
def test_background_alignment_option_on_a_16_layer_lm(background):
    """``none``: the alignment loss ignores what background tokens are aligned to (stage 2 and
    stage 3's merged tokens); ``word``: background tokens are aligned to ``nothing``.  The 16-layer
    LM trains with the attention supervision on layers 1 and 2, as the 8-layer one."""
    from transformers import LlavaForConditionalGeneration

    train = _train_script()
    args = train.parse_args([*V3[:2], "--background-align", background, "--text-layers", "16"])
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build.build_config(2, 32, args.text_layers, 32)).eval()
    assert len(model.model.language_model.layers) == 16
    vocab, batch = _v3_batch(train)
    other = train.Vocab(vocab.tok)
    other.id = {**vocab.id, "nothing": vocab.id["red"]}  # background aligned to another word

    lm = model.model.language_model
    probe = train.AttentionProbe(lm.layers[args.attn_layer])
    copy_probe = train.AttentionProbe(lm.layers[args.attn_layer - 1])
    res = train.stage2_forward(model, vocab, batch, args, qa=True, probe=probe, copy_probe=copy_probe)
    assert torch.isfinite(res["loss"]) and 0 < float(res["attn_mass"]) < 1 and 0 < float(res["copy_mass"]) < 1
    res["loss"].backward()
    assert lm.layers[15].mlp.down_proj.weight.grad.abs().sum() > 0
    probe.handle.remove()
    copy_probe.handle.remove()

    with torch.no_grad():
        a = train.stage2_forward(model, vocab, batch, args, qa=False)["align"]
        b = train.stage2_forward(model, other, batch, args, qa=False)["align"]
        phys = train.shortened(
            vocab, batch, random.Random(2), {}, kind="merge", k=16, biased=False, keep_positions=False, pre=True
        )
        c = train.stage3_forward(model, vocab, batch, phys, args)["align"]
        d = train.stage3_forward(model, other, batch, phys, args)["align"]
    if background == "none":
        assert torch.allclose(a, b) and torch.allclose(c, d)
        assert torch.equal(train.align_weights(batch["shapes"], args), (batch["shapes"] > 0).float())
    else:
        assert not torch.allclose(a, b) and not torch.allclose(c, d)
