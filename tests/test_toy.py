"""Tests of the toy VQA benchmark (vtc.eval.toy) and, once shipped, its trained model."""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import numpy as np
import pytest

from vtc.eval import toy
from vtc.eval.toy import build, scenes

ROOT = Path(__file__).resolve().parents[1]

PATTERNS = {
    "color": re.compile(r"what color is the (\w+)\?"),
    "shape": re.compile(r"what shape is the (\w+) object\?"),
    "presence": re.compile(r"is there a (\w+) (\w+)\?"),
    "count": re.compile(r"how many objects are there\?"),
    "left_of": re.compile(r"is the (\w+) left of the (\w+)\?"),
}


def recompute(scene: scenes.Scene, kind: str, question: str) -> str:
    """The answer from the scene description alone (never from the image)."""
    m = PATTERNS[kind].fullmatch(question)
    assert m, question
    objs = scene.objects
    if kind == "color":
        (hit,) = [o for o in objs if o.shape == m[1]]
        return hit.color
    if kind == "shape":
        (hit,) = [o for o in objs if o.color == m[1]]
        return hit.shape
    if kind == "presence":
        return "yes" if any(o.color == m[1] and o.shape == m[2] for o in objs) else "no"
    if kind == "count":
        return ["zero", "one", "two", "three", "four"][len(objs)]
    (a,) = [o for o in objs if o.shape == m[1]]
    (b,) = [o for o in objs if o.shape == m[2]]
    assert abs(a.center[0] - b.center[0]) >= 20
    return "yes" if a.center[0] < b.center[0] else "no"


@pytest.fixture(scope="module")
def records() -> list[scenes.Record]:
    return toy.generate(150, seed=11, kinds=toy.ALL_KINDS)


def test_generate_is_deterministic():
    a, b = toy.generate(12, seed=3), toy.generate(12, seed=3)
    for x, y in zip(a, b, strict=True):
        assert (x.question, x.answer, x.kind, x.scene) == (y.question, y.answer, y.kind, y.scene)
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    c = toy.generate(12, seed=4)
    assert [r.scene for r in a] != [r.scene for r in c]


def test_required_kinds_cycle_by_default():
    recs = toy.generate(9, seed=0)
    assert [r.kind for r in recs] == list(toy.REQUIRED_KINDS) * 3
    for r in recs:
        assert r.image.size == (168, 168) and r.image.mode == "RGB"
        assert re.fullmatch(r"[a-z]+", r.answer)


def test_answers_recomputed_from_scene(records):
    for r in records:
        assert recompute(r.scene, r.kind, r.question) == r.answer, r.question


def test_scenes_are_unambiguous(records):
    for r in records:
        objs = r.scene.objects
        assert 2 <= len(objs) <= 4
        assert len({o.shape for o in objs}) == len(objs) and len({o.color for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            x0, y0, x1, y1 = a.bbox
            assert 0 <= x0 < x1 <= 168 and 0 <= y0 < y1 <= 168
            for b in objs[i + 1 :]:
                assert (
                    a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0] or a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1]
                )


def test_presence_is_balanced():
    recs = [r for r in toy.generate(600, seed=2) if r.kind == "presence"]
    yes = sum(r.answer == "yes" for r in recs) / len(recs)
    assert 0.4 < yes < 0.6


def test_render_matches_scene(records):
    for r in records[:40]:
        arr = np.asarray(r.image).astype(int)
        for o in r.scene.objects:
            cx, cy = (int(v) for v in o.center)
            assert np.abs(arr[cy, cx] - np.array(scenes.COLORS[o.color])).max() < 40, (o, arr[cy, cx])
        assert np.abs(arr[1, 1] - np.array(r.scene.background)).max() < 30


def test_patch_labels_mark_few_object_patches(records):
    fractions = []
    for r in records[:40]:
        colors, shapes = toy.patch_labels(r.scene)
        assert colors.shape == shapes.shape == (144,)
        assert np.array_equal(colors > 0, shapes > 0)
        for o in r.scene.objects:
            sid = toy.SHAPES.index(o.shape) + 1
            assert (shapes == sid).sum() >= 4
            assert set(colors[shapes == sid].tolist()) == {toy.COLOR_NAMES.index(o.color) + 1}
        fractions.append((shapes > 0).mean())
    assert 0.1 < np.mean(fractions) < 0.3  # most patches carry no answer


def test_processor_expands_image_and_template():
    proc = build.build_processor()
    text = toy.prompt(proc, "what color is the circle?")
    assert text == "USER: <image>\nwhat color is the circle? ASSISTANT:"
    rec = toy.generate(1, seed=0)[0]
    enc = proc(images=rec.image, text=text, return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, 168, 168)
    ids = enc["input_ids"][0].tolist()
    assert ids.count(proc.image_token_id) == 144
    words = proc.tokenizer.convert_ids_to_tokens([i for i in ids if i != proc.image_token_id])
    assert words == ["<s>", "USER", ":", "what", "color", "is", "the", "circle", "?", "ASSISTANT", ":"]
    assert "<unk>" not in proc.tokenizer.convert_ids_to_tokens(
        proc.tokenizer(" ".join(r.question for r in toy.generate(30, 1, kinds=toy.ALL_KINDS)))["input_ids"]
    )


def _train_script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("train_toy", ROOT / "scripts" / "train_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_inputs_match_processor():
    """The training script's sequences and pixels are what the saved processor produces."""
    train = _train_script()
    proc = build.build_processor()
    rec = toy.generate(1, seed=5)[0]
    enc = proc(images=rec.image, text=toy.prompt(proc, rec.question), return_tensors="pt")
    ids, labels = train.build_sequence(train.Vocab(proc.tokenizer), [(rec.question, rec.answer, rec.kind)], 144)
    n = enc["input_ids"].shape[1]
    assert ids[:n] == enc["input_ids"][0].tolist()
    assert proc.tokenizer.decode(ids[n:]) == f"{rec.answer} </s>"
    assert labels[:n] == [-100] * n
    assert np.allclose(train.pixels([rec.image]).numpy(), enc["pixel_values"].numpy(), atol=1e-5)


shipped = pytest.mark.skipif(
    not (toy.MODEL_PATH / "config.json").is_file(),
    reason=f"trained toy model not shipped yet ({toy.MODEL_PATH} missing; run scripts/train_toy.py)",
)


@pytest.fixture(scope="module")
def model_and_processor():
    import torch

    torch.set_num_threads(1)
    return toy.load()


@shipped
def test_shipped_model_loads_offline(model_and_processor):
    model, processor = model_and_processor
    import torch

    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.text_config.num_hidden_layers >= 8
    size = sum(f.stat().st_size for f in toy.MODEL_PATH.iterdir() if f.is_file())
    assert size < 25e6


@shipped
def test_shipped_model_answers_fixed_set(model_and_processor):
    model, processor = model_and_processor
    recs = toy.generate(30, seed=toy.EVAL_SEED + 1)
    batched = toy.answer(model, processor, recs, batch_size=10)
    assert toy.score(recs, batched)["overall"] >= 0.9, list(zip([r.answer for r in recs], batched))
    assert toy.answer(model, processor, recs[:4], batch_size=1) == batched[:4]  # left padding is harmless
