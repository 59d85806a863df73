"""The Qwen2.5-VL-format toy (vtc.eval.toy.build_qwen, scripts/train_toy_qwen.py): its processor, that the
training code builds what the processor and the model compute, and that `vtc sweep` runs it through
lmms-eval. None of this needs the trained model; its own checks run once it is shipped."""

from __future__ import annotations

import importlib.util
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from vtc.eval import toy
from vtc.eval.toy import build_qwen, scenes

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> types.ModuleType:
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # the scripts import each other from beside them
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():
    """A random-weight model of the toy's format (2 tower blocks, 2 LM layers) and its processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(build_qwen.build_config(vision_layers=2, vision_width=32,
                                                                       text_layers=2, text_width=64))
    return model.eval(), build_qwen.build_processor()


@pytest.fixture(scope="module")
def tiny_saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-qwen-shaped")
    model, processor = tiny
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_generate_sizes_alternate_and_default_is_unchanged():
    recs = toy.generate(4, seed=3, sizes=(168, 224))
    assert [r.image.size for r in recs] == [(168, 168), (224, 224)] * 2
    assert [r.scene.size for r in recs] == [168, 224] * 2
    assert [len(scenes.patch_labels(r.scene)[0]) for r in recs[:2]] == [144, 256]
    default, explicit = toy.generate(3, seed=3), toy.generate(3, seed=3, sizes=(168,))
    assert [r.scene for r in default] == [r.scene for r in explicit]


@pytest.mark.parametrize("size, tokens", [(168, 144), (224, 256)])
def test_processor_gives_qwen_inputs(size, tokens):
    proc = build_qwen.build_processor()
    rec = toy.generate(1, seed=2, sizes=(size,))[0]
    enc = proc(images=rec.image, text=toy.prompt(proc, rec.question), return_tensors="pt")
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == tokens
    assert enc["image_grid_thw"].tolist() == [[1, size // 7, size // 7]]
    assert torch.equal(enc["mm_token_type_ids"], (enc["input_ids"] == proc.image_token_id).long())
    assert "<unk>" not in proc.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])


@pytest.mark.parametrize("size", [168, 224])
def test_training_inputs_match_processor_and_model(tiny, size):
    """The training script's sequences, 3-D positions and image tokens are those of the processor and the
    model's own ``get_rope_index`` / ``get_image_features``."""
    model, proc = tiny
    q, train = _script("train_toy_qwen"), _script("train_toy")
    vocab = train.Vocab(proc.tokenizer, words=build_qwen.vocabulary(), aliases=build_qwen.ALIASES)
    layout = q.QwenLayout(proc, (size,))
    rec = toy.generate(1, seed=5, sizes=(size,))[0]
    enc = proc(images=rec.image, text=toy.prompt(proc, rec.question), return_tensors="pt")
    grid = (size // 14, size // 14)
    ids, labels = q.qwen_sequence(vocab, [(rec.question, rec.answer, rec.kind)], grid[0] * grid[1])
    n = enc["input_ids"].shape[1]
    assert ids[:n] == enc["input_ids"][0].tolist()
    assert proc.tokenizer.convert_ids_to_tokens(ids[n:]) == [rec.answer, "<|im_end|>"]
    assert labels[:n] == [-100] * n
    want, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                         attention_mask=enc["attention_mask"])
    got = layout.positions({"ids": torch.tensor([ids]), "grid": grid})
    assert torch.equal(got[:, :, :n], want)
    with torch.no_grad():
        ref = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
        ref = torch.cat(list(ref.pooler_output))
        mine = layout.project(model, q.tower_tokens(model.model.visual, enc["pixel_values"], enc["image_grid_thw"]))
    assert torch.allclose(mine[0], ref, atol=1e-5)


def test_shortened_positions_keep_or_compact_as_the_adapter():
    """Stage 3's rows: kept 3-D positions are the full prompt's at the survivors (text after the image
    unchanged); compact ones are the adapter's ``compact_positions`` (a 2x2 pool: the 6x6 grid)."""
    from vtc.patches.qwen2_5_vl import Qwen2_5_VLAdapter

    q, train = _script("train_toy_qwen"), _script("train_toy")
    import toy_shorten as S

    proc = build_qwen.build_processor()
    vocab = train.Vocab(proc.tokenizer, words=build_qwen.vocabulary(), aliases=build_qwen.ALIASES)
    layout = q.QwenLayout(proc, (168,))
    rng = random.Random(0)
    scs = [scenes.make_scene(rng) for _ in range(2)]
    labels = [scenes.patch_labels(sc) for sc in scs]
    cache = {"feats": torch.randn(2, 145, 8), "colors": torch.tensor(labels[0][0])[None].repeat(2, 1),
             "shapes": torch.stack([torch.tensor(s) for _, s in labels]), "scenes": scs, "grid": (12, 12)}
    batch = train.make_batch(vocab, cache, [0, 1], rng, 2, train.KIND_WEIGHTS, layout.sequence)
    full = layout.positions(batch)
    gen = torch.Generator().manual_seed(0)
    kw = layout.row_kwargs(batch)
    specs = [S.row_spec(rng, gen, batch["feats"][0], batch["shapes"][0], {}, kind="subset", k=16,
                        keep_positions=True, **kw),
             S.row_spec(rng, gen, batch["feats"][1], batch["shapes"][1], {}, kind="pool", k=36,
                        keep_positions=False, **kw)]
    phys = S.apply_specs(batch, specs, vocab.id["<image>"], vocab.id["<pad>"])
    pos = layout.shortened_positions(phys, specs, batch)
    kept = torch.cat([torch.arange(3), 3 + specs[0].pos, torch.arange(3 + 144, int(batch["mask"][0].sum()))])
    assert torch.equal(pos[:, 0, : len(kept)], full[:, 0, kept])
    pooled = pos[:, 1, 3 : 3 + 36]
    assert pooled[1].unique().tolist() == list(range(3, 9)) and pooled[2].unique().tolist() == list(range(3, 9))
    keep_rows = layout.shortened_positions(phys, [specs[0], S.RowSpec(specs[1].w, specs[1].pos, specs[1].visible,
                                                                        True)], batch)
    image = torch.zeros(1, phys["ids"].shape[1], dtype=torch.bool)
    image[0, 3:39] = True
    want, _ = Qwen2_5_VLAdapter.compact_positions(keep_rows[:, 1:2], image, phys["mask"][1:2].bool())
    assert torch.equal(pos[:, 1], want[:, 0])
    # Tokens hidden by the attention mask are still in the sequence: every position stays.
    masked = [S.row_spec(rng, gen, batch["feats"][r], batch["shapes"][r], {}, kind="mask", k=16, **kw)
              for r in range(2)]
    phys = S.apply_specs(batch, masked, vocab.id["<image>"], vocab.id["<pad>"])
    assert int(phys["mask"][0, 3:147].sum()) == 16
    real = batch["mask"].bool()
    assert torch.equal(layout.shortened_positions(phys, masked, batch)[:, real], full[:, real])


def test_stage1_object_labels_follow_the_tower_order(tiny):
    """Stage 1's per-patch object ids line up with the per-token labels, and the attention target is
    each object patch's own object (its mass starts near the object's share of the image)."""
    model, proc = tiny
    q = _script("train_toy_qwen")
    layout = q.QwenLayout(proc, (168, 224))
    batch = layout.stage1_batch(random.Random(3), 2)
    objects, shapes = batch[5], batch[3]
    tokens = objects.view(2, -1, 4)  # the processor's order: each token's 2x2 patches
    assert ((shapes > 0) <= (tokens > 0).any(-1)).all()
    assert (tokens.amax(-1)[shapes > 0] > 0).all()
    heads = layout.stage1_heads(model.model.visual)
    loss, _, _ = layout.stage1_forward(model.model.visual, heads, batch)
    assert torch.isfinite(loss) and 0.0 < layout.last_mass < 0.5
    assert q.processor_order(4, 4).tolist()[:8] == [0, 1, 4, 5, 2, 3, 6, 7]


def test_load_by_family(tiny_saved):
    model, processor = toy.load(tiny_saved, family="qwen2_5_vl")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    recs = toy.generate(3, seed=1, sizes=(168, 224))
    assert len(toy.answer(model, processor, recs)) == 3
    with pytest.raises(ValueError, match="no toy model of family"):
        toy.load(family="nope")


def test_sweep_runs_the_qwen_toy_through_lmms_eval(tiny_saved, tmp_path, monkeypatch):
    """``vtc sweep`` on a Qwen2.5-VL-format model (the path every Qwen2.5-VL checkpoint takes): the
    processor's ``image_grid_thw`` and ``mm_token_type_ids`` reach the model; [CLS] methods are skipped."""
    pytest.importorskip("lmms_eval")
    from vtc.eval import sweep

    monkeypatch.setenv("VTC_CACHE", str(tmp_path / "cache"))
    spec = sweep.SweepSpec(model=str(tiny_saved), methods=["random", "visionzip", "vtc_cls"], budgets=[1 / 9],
                           limit=4, batch_size=2, out=str(tmp_path / "out"), device="cpu", repeats=1)
    _, infeasible = sweep.plan_cells(spec)
    assert [c.method for c, _ in infeasible] == ["vtc_cls"]
    out = sweep.run(spec, progress=False)
    rows = {r["cell"]: r for r in sweep.read_results(out)}
    assert sorted(rows) == ["full", f"random@{1 / 9:g}", f"visionzip@{1 / 9:g}"]
    assert rows["full"]["costs"]["tokens_entering_llm"] == 144  # toy_vqa's 168 px images
    assert rows[f"random@{1 / 9:g}"]["costs"]["tokens_entering_llm"] == 16
    assert sweep.model_path("toy-qwen") == str(toy.QWEN_MODEL_PATH)


def test_toy_vqa_sizes_task_alternates_image_sizes(tmp_path, monkeypatch):
    """``toy_vqa_sizes``: the toy questions with 168 and 224 px images in turn, known to the sweep."""
    pytest.importorskip("lmms_eval")
    import datasets

    from vtc.eval import sweep
    from vtc.eval.toy_task import prepare

    path = prepare(tmp_path / "sizes", n=4, task="toy_vqa_sizes")
    data = datasets.load_from_disk(str(path / "data"))["test"]
    assert [im.size for im in data["image"]] == [(168, 168), (224, 224)] * 2
    assert "task: toy_vqa_sizes" in (path / "toy_vqa_sizes.yaml").read_text()
    monkeypatch.setenv("VTC_CACHE", str(tmp_path / "cache"))
    spec = sweep.SweepSpec(model="toy", tasks=["toy_vqa_sizes"], limit=4, out=str(tmp_path / "out"))
    assert "toy_vqa_sizes" in sweep.prepare_tasks(spec).all_tasks
    with pytest.raises(ValueError, match="unknown toy task"):
        prepare(tmp_path / "x", task="toy_vqa_huge")


shipped = pytest.mark.skipif(
    not (toy.QWEN_MODEL_PATH / "config.json").is_file(),
    reason=f"trained Qwen2.5-VL toy not shipped yet ({toy.QWEN_MODEL_PATH} missing; run scripts/train_toy_qwen.py)",
)


@shipped
def test_shipped_qwen_toy_answers_both_sizes():
    torch.set_num_threads(1)
    model, processor = toy.load(family="qwen2_5_vl")
    recs = toy.generate(60, seed=toy.EVAL_SEED, sizes=build_qwen.SIZES)
    assert toy.evaluate(model, processor, recs)["overall"] >= 0.95
