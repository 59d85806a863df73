#!/usr/bin/env python
"""Train the toy LLaVA model of ``vtc.eval.toy`` on CPU, resumably, and ship it.

Stages (each checkpointed under ``--work``; rerunning the same command resumes):

1. ``stage1``: a CLIP ViT (transformers ``CLIPVisionModel``) trained from scratch with a
   multi-label objective on [CLS] (which color-shape pairs are present, on the last and on
   the feature layer) and a dense per-patch objective (color and shape class incl.
   background) on the LLaVA feature layer (-2).  Gate: per-patch shape accuracy on object
   patches > 90% on held-out scenes, else training is extended.  Then frozen.
1b. ``stage1b``: the tower's [CLS] attention taught to cover every object (query and key
   projections only, the patch features held to stage 1's), as CLIP's [CLS] attends to
   salient objects, which [CLS]-attention pruning relies on.
2. ``cache``: the frozen tower's layer -2 features ([CLS] + patches) of the LM's scenes (float16).
3. ``stage2``: 2-layer GELU projector + 8-layer Llama.  First an alignment warm-up (each
   image token predicts its color and shape word, or ``nothing``, through the tied LM
   head), then multi-turn question answering (8 questions per image) with the alignment
   loss kept as an auxiliary, attention supervision (LM layer 1 head 0 reads the
   question's color/shape words, layer 2 head 0 looks at the queried objects' tokens)
   and token-drop augmentation (image tokens hidden from attention in half the sequences).
3b. ``stage3``: the same losses on *shortened* sequences (``toy_shorten``): image tokens
   dropped (positions re-indexed or kept), merged, pooled, or laid out as VisionZip does,
   so that the model answers from what compression methods hand a real VLM.
4. ``final``: assemble ``LlavaForConditionalGeneration`` + ``LlavaProcessor``,
   ``save_pretrained`` into ``--model-dir`` and score it with ``generate`` on 500
   questions of the held-out seed.

Example:
    nohup .venv/bin/python scripts/train_toy.py >> runs/toy/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import toy_shorten  # scripts/toy_shorten.py, beside this file
from torch import nn

from vtc.eval import toy
from vtc.eval.toy import build, scenes

ROOT = Path(__file__).resolve().parents[1]



CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
N_PAIRS = len(scenes.COLOR_NAMES) * len(scenes.SHAPES)
IMAGE_START = toy_shorten.IMAGE_START  # <s> USER : <image>...
SHORTEN_KINDS = ("full", "mask", "subset", "merge", "pool", "visionzip")
KIND_WEIGHTS = {"color": 0.28, "shape": 0.28, "presence": 0.28, "count": 0.08, "left_of": 0.08}


# ----------------------------------------------------------------------------- utils


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def batch_rng(seed: int, tag: str, step: int) -> random.Random:
    """A deterministic RNG per (stage, step), so a resumed run sees the same batches."""
    return random.Random(f"{seed}-{tag}-{step}")


def pixels(images: list) -> torch.Tensor:
    """CLIP-normalized ``(B, 3, H, W)`` tensor, identical to the saved processor's output."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    arr = (arr - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def pair_targets(scene: scenes.Scene) -> np.ndarray:
    t = np.zeros(N_PAIRS, dtype=np.float32)
    for o in scene.objects:
        t[scenes.COLOR_NAMES.index(o.color) * len(scenes.SHAPES) + scenes.SHAPES.index(o.shape)] = 1
    return t


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.exists() else None


def finished(ck: dict | None, stage: str, module: nn.Module, key: str) -> bool:
    """Whether checkpoint ``ck`` is of a finished stage; if so its weights ``ck[key]`` are
    loaded into ``module``, so a rerun skips the stage."""
    if ck is None or not ck.get("done"):
        return False
    module.load_state_dict(ck[key])
    log(f"{stage}: done already ({ck['metrics']})")
    return True


# ---------------------------------------------------------------------------- stage 1


class Stage1Heads(nn.Module):
    """Training-only heads on the vision tower: [CLS] pairs (2 layers) + per-patch color/shape."""

    def __init__(self, width: int):
        super().__init__()
        self.cls_last = nn.Linear(width, N_PAIRS)
        self.cls_feat = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, N_PAIRS))
        self.norm = nn.LayerNorm(width)
        self.color = nn.Linear(width, len(scenes.COLOR_NAMES) + 1)
        self.shape = nn.Linear(width, len(scenes.SHAPES) + 1)


def stage1_batch(rng: random.Random, n: int, style: str = "flat") -> tuple[torch.Tensor, ...]:
    scs = [scenes.make_scene(rng, style=style) for _ in range(n)]
    labels = [scenes.patch_labels(s) for s in scs]
    x = pixels([scenes.render(s) for s in scs])
    colors = torch.from_numpy(np.stack([c for c, _ in labels]))
    shapes = torch.from_numpy(np.stack([s for _, s in labels]))
    pairs = torch.from_numpy(np.stack([pair_targets(s) for s in scs]))
    return x, colors, shapes, pairs


def stage1_forward(tower: nn.Module, heads: Stage1Heads, batch: tuple[torch.Tensor, ...]) -> tuple:
    x, colors, shapes, pairs = batch
    out = tower(pixel_values=x, output_hidden_states=True)
    feat = out.hidden_states[-2]
    patches = heads.norm(feat[:, 1:])
    c_logits, s_logits = heads.color(patches), heads.shape(patches)
    # Object patches are the minority: weight them up so shape is learned, not background.
    w = torch.where(shapes > 0, 3.0, 1.0)
    dense = (F.cross_entropy(c_logits.transpose(1, 2), colors, reduction="none") * w).mean()
    dense = dense + (F.cross_entropy(s_logits.transpose(1, 2), shapes, reduction="none") * w).mean()
    cls = F.binary_cross_entropy_with_logits(heads.cls_last(out.pooler_output), pairs)
    cls = cls + F.binary_cross_entropy_with_logits(heads.cls_feat(feat[:, 0]), pairs)
    return dense + cls, c_logits, s_logits


@torch.no_grad()
def stage1_eval(tower: nn.Module, heads: Stage1Heads, seed: int, n: int = 384, style: str = "flat") -> dict:
    tower.eval()
    rng = random.Random(f"{seed}-stage1-val")
    stats = {"color_obj": [], "shape_obj": [], "bg": [], "pairs": []}
    for _ in range(n // 32):
        batch = stage1_batch(rng, 32, style)
        _, c_logits, s_logits = stage1_forward(tower, heads, batch)
        _, colors, shapes, pairs = batch
        obj = shapes > 0
        stats["color_obj"].append((c_logits.argmax(-1) == colors)[obj].float().mean().item())
        stats["shape_obj"].append((s_logits.argmax(-1) == shapes)[obj].float().mean().item())
        stats["bg"].append((s_logits.argmax(-1) == shapes)[~obj].float().mean().item())
        out = tower(pixel_values=batch[0])
        pred = heads.cls_last(out.pooler_output) > 0
        stats["pairs"].append((pred == (pairs > 0.5)).all(-1).float().mean().item())
    tower.train()
    return {k: float(np.mean(v)) for k, v in stats.items()}


def run_stage1(args: argparse.Namespace, tower: nn.Module) -> dict:
    path = args.work / "stage1.pt"
    ck = load_ckpt(path)
    if finished(ck, "stage1", tower, "tower"):
        return ck["metrics"]
    fam = layout(args)
    heads = fam.stage1_heads(tower)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr1, weight_decay=0.01)
    step, total, extensions = 0, args.stage1_steps, 0
    if ck is not None:
        tower.load_state_dict(ck["tower"])
        heads.load_state_dict(ck["heads"])
        opt.load_state_dict(ck["opt"])
        step, total, extensions = ck["step"], ck["total"], ck["extensions"]
        log(f"stage1: resumed at step {step}/{total}")
    tower.train()

    def snapshot(done: bool = False, metrics: dict | None = None) -> None:
        save_atomic(
            {
                "tower": tower.state_dict(),
                "heads": heads.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "total": total,
                "extensions": extensions,
                "done": done,
                "metrics": metrics,
            },
            path,
        )

    t0, last_save, losses = time.time(), time.time(), []
    while True:
        while step < total:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.stage1_steps, args.lr1, 50)
            batch = fam.stage1_batch(batch_rng(args.seed, "s1", step), args.batch1)
            loss, _, _ = fam.stage1_forward(tower, heads, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            if step % 25 == 0:
                rate = (time.time() - t0) / len(losses)
                log(
                    f"stage1 step {step}/{total} loss {np.mean(losses[-25:]):.4f} "
                    f"{rate:.2f}s/step eta {rate * (total - step) / 60:.1f} min"
                )
            if step % 200 == 0:
                log(f"stage1 val {fam.stage1_eval(tower, heads, args.seed, 128)}")
            if time.time() - last_save > args.save_every:
                snapshot()
                last_save = time.time()
        metrics = fam.stage1_eval(tower, heads, args.seed)
        log(f"stage1 gate check: {metrics}")
        if metrics["shape_obj"] > args.gate:
            break
        if extensions >= 3:
            snapshot(metrics=metrics)
            raise SystemExit("stage1: per-patch shape accuracy stayed <= 90%; not moving on")
        extensions += 1
        total += args.stage1_steps // 3
        log(f"stage1: gate not met, extending to {total} steps")
    snapshot(done=True, metrics=metrics)
    log("stage1: done, tower frozen")
    return metrics


# ---------------------------------------------------------------------------- stage 1b


def cls_attention_rows(tower: nn.Module, x: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([len(layers), B, N], patch features of layer -2)``: each layer's [CLS] attention to
    the patches (mean over heads) and the features LLaVA reads."""
    out = tower(pixel_values=x, output_hidden_states=True, output_attentions=True)
    rows = torch.stack([out.attentions[i][:, :, 0, 1:].mean(1) for i in layers])
    return rows, out.hidden_states[-2][:, 1:]


def cls_layers(tower: nn.Module) -> list[int]:
    """The layers whose [CLS] attention stage 1b teaches: from layer 1 to LLaVA's feature layer."""
    return list(range(1, tower.config.num_hidden_layers - 1))


@torch.no_grad()
def stage1b_eval(tower: nn.Module, teacher: nn.Module, seed: int, n: int = 128, style: str = "flat") -> dict:
    """Share of objects with a patch among the top 16 / 48 patches by [CLS] attention at the
    feature layer, and the features' drift from stage 1's (relative squared error)."""
    tower.eval()
    rng = random.Random(f"{seed}-stage1b-val")
    hits: dict[str, list[float]] = {"covered16": [], "covered48": [], "drift": []}
    for _ in range(n // 32):
        scs = [scenes.make_scene(rng, style=style) for _ in range(32)]
        x = pixels([scenes.render(sc) for sc in scs])
        rows, feats = cls_attention_rows(tower, x, [tower.config.num_hidden_layers - 2])
        ref = teacher(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        hits["drift"].append(float(((feats - ref) ** 2).mean() / (ref**2).mean()))
        shapes = torch.from_numpy(np.stack([scenes.patch_labels(sc)[1] for sc in scs]))
        for k in (16, 48):
            top = torch.zeros_like(shapes, dtype=torch.bool).scatter_(1, rows[0].topk(k).indices, True)
            for row, sc in enumerate(scs):
                ids = [scenes.SHAPES.index(o.shape) + 1 for o in sc.objects]
                hits[f"covered{k}"].append(np.mean([bool((top[row] & (shapes[row] == i)).any()) for i in ids]))
    tower.train()
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items()}


def run_stage1b(args: argparse.Namespace, tower: nn.Module) -> dict:
    """Teach the tower's [CLS] to attend to every object (as CLIP's [CLS] attends to salient
    objects, which [CLS]-attention pruning relies on), keeping the patch features LLaVA reads:
    cross-entropy of the [CLS] attention (layers 1 to the feature layer, mean over heads)
    against a uniform distribution over object patches, plus the features' squared drift from
    stage 1's tower; only the query and key projections train."""
    path = args.work / "stage1b.pt"
    ck = load_ckpt(path)
    if finished(ck, "stage1b", tower, "tower"):
        return ck["metrics"]
    teacher = copy.deepcopy(tower).eval().requires_grad_(False)
    if ck is not None:
        teacher.load_state_dict(ck["teacher"])
    old_impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # attention weights are needed here
    layers = cls_layers(tower)
    params = [
        p for i in layers for proj in ("q_proj", "k_proj")
        for p in getattr(tower.encoder.layers[i].self_attn, proj).parameters()
    ]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr1b, weight_decay=0.0)
    step = 0
    if ck is not None:
        tower.load_state_dict(ck["tower"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        log(f"stage1b: resumed at step {step}/{args.cls_steps}")
    else:
        log(f"stage1b: before, {stage1b_eval(tower, teacher, args.seed, style=args.scene_style)}")
    tower.train()

    def snapshot(done: bool = False, metrics: dict | None = None) -> None:
        save_atomic({"tower": tower.state_dict(), "teacher": teacher.state_dict(), "opt": opt.state_dict(),
                     "step": step, "done": done, "metrics": metrics}, path)

    t0, last_save, n0 = time.time(), time.time(), step
    while step < args.cls_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.cls_steps, args.lr1b, 20)
        rng = batch_rng(args.seed, "s1b", step)
        scs = [scenes.make_scene(rng, style=args.scene_style) for _ in range(args.batch1)]
        x = pixels([scenes.render(sc) for sc in scs])
        shapes = torch.from_numpy(np.stack([scenes.patch_labels(sc)[1] for sc in scs]))
        target = (shapes > 0).float() / (shapes > 0).float().sum(-1, keepdim=True)
        rows, feats = cls_attention_rows(tower, x, layers)
        with torch.no_grad():
            ref = teacher(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        attn = -(target * (rows + 1e-6).log()).sum(-1).mean()
        drift = ((feats - ref) ** 2).mean() / (ref**2).mean()
        loss = attn + args.drift_weight * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            rate = (time.time() - t0) / (step - n0)
            log(f"stage1b step {step}/{args.cls_steps} attn {attn.item():.4f} drift {drift.item():.5f} "
                f"{rate:.2f}s/step eta {rate * (args.cls_steps - step) / 60:.1f} min")
        if time.time() - last_save > args.save_every:
            snapshot()
            last_save = time.time()
    for p in params:
        p.requires_grad_(False)
    metrics = stage1b_eval(tower, teacher, args.seed, style=args.scene_style)
    tower.config._attn_implementation = old_impl
    log(f"stage1b: done, {metrics}")
    snapshot(done=True, metrics=metrics)
    return metrics


# ------------------------------------------------------------------------------ cache


def tower_tag(args: argparse.Namespace) -> str:
    """Which tower the cached features come from (stage 1, or stage 1b after it)."""
    return "stage1b" if args.cls_steps > 0 else "stage1"


@torch.no_grad()
def run_cache(args: argparse.Namespace, tower: nn.Module) -> dict:
    path = args.work / "features.pt"
    if path.exists():
        cache = torch.load(path, weights_only=False)
        if (
            cache["n"] == args.n_cache + args.n_val
            and cache.get("with_cls")
            and cache.get("tower") == tower_tag(args)
            and cache.get("style", "flat") == args.scene_style
        ):
            return cache
    tower.eval()
    rng = random.Random(f"{args.seed}-stage2-scenes")
    n = args.n_cache + args.n_val
    feats, colors, shapes, all_scenes = [], [], [], []
    t0 = time.time()
    for start in range(0, n, 64):
        scs = [scenes.make_scene(rng, style=args.scene_style) for _ in range(min(64, n - start))]
        out = tower(pixel_values=pixels([scenes.render(s) for s in scs]), output_hidden_states=True)
        feats.append(out.hidden_states[-2].to(torch.float16))  # [CLS] kept in column 0
        labels = [scenes.patch_labels(s) for s in scs]
        colors.append(torch.from_numpy(np.stack([c for c, _ in labels])).to(torch.int8))
        shapes.append(torch.from_numpy(np.stack([s for _, s in labels])).to(torch.int8))
        all_scenes.extend(scs)
        if (start // 64) % 20 == 0:
            log(f"cache {start + len(scs)}/{n} ({time.time() - t0:.0f}s)")
    cache = {
        "n": n,
        "with_cls": True,
        "tower": tower_tag(args),
        "style": args.scene_style,
        "feats": torch.cat(feats),
        "colors": torch.cat(colors),
        "shapes": torch.cat(shapes),
        "scenes": all_scenes,
    }
    save_atomic(cache, path)
    log(f"cache: {n} images in {time.time() - t0:.0f}s")
    return cache


# ---------------------------------------------------------------------------- stage 2


class Vocab:
    """Token ids of the word-level tokenizer, for building training sequences."""

    def __init__(self, tokenizer, words: list[str] | None = None, aliases: dict[str, str] | None = None):
        self.tok = tokenizer
        aliases = aliases or {}
        words = [*(words or build.vocabulary()), *aliases]
        # ``aliases``: another format's tokens where this code says <s>, </s>, <pad>, <image>.
        self.id = {w: tokenizer.convert_tokens_to_ids(aliases.get(w, w)) for w in words}

    def words(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def build_sequence(v: Vocab, turns: list[tuple[str, str, str]], n_image: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except answer word and its ``</s>``) of a multi-turn chat.

    Matches ``apply_chat_template`` + the processor's ``<image>`` expansion token for token.
    """
    ids = [v.id["<s>"], v.id["USER"], v.id[":"]] + [v.id["<image>"]] * n_image
    labels = [-100] * len(ids)
    for i, (question, answer, *_rest) in enumerate(turns):
        head = [] if i == 0 else [v.id["USER"], v.id[":"]]
        prompt = head + v.words(question) + [v.id["ASSISTANT"], v.id[":"]]
        ids += prompt + [v.id[answer], v.id["</s>"]]
        labels += [-100] * len(prompt) + [v.id[answer], v.id["</s>"]]
    return ids, labels


def relevant_shapes(scene: scenes.Scene, kind: str, params: dict[str, str]) -> list[int]:
    """Shape ids (1-based, as in the patch labels) of the objects a question is about."""
    return [scenes.SHAPES.index(o.shape) + 1 for o in scenes.asked_objects(scene, kind, params)]


def sample_turns(scene: scenes.Scene, rng: random.Random, n: int, kinds: dict[str, float]) -> list:
    """``n`` questions ``(question, answer, kind, relevant shape ids)`` about one scene."""
    names = [k for k in kinds if scenes.can_ask(scene, k)]
    weights = [kinds[k] for k in names]
    turns = []
    for kind in rng.choices(names, weights, k=n):
        q, a, params = scenes.ask(scene, kind, rng)
        turns.append((q, a, kind, relevant_shapes(scene, kind, params)))
    return turns


def align_targets(v: Vocab, colors: torch.Tensor, shapes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Soft targets per image token: half color word, half shape word; ``nothing`` for background
    (whose weight :func:`align_weights` sets)."""
    color_ids = torch.tensor([v.id["nothing"]] + [v.id[c] for c in scenes.COLOR_NAMES])
    shape_ids = torch.tensor([v.id["nothing"]] + [v.id[s] for s in scenes.SHAPES])
    t = torch.zeros(*colors.shape, vocab_size)
    t.scatter_add_(-1, color_ids[colors.long()].unsqueeze(-1), torch.full((*colors.shape, 1), 0.5))
    t.scatter_add_(-1, shape_ids[shapes.long()].unsqueeze(-1), torch.full((*colors.shape, 1), 0.5))
    return t


def align_weights(shapes: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Per image token, the weight of its alignment loss: object tokens 1; background tokens 0.25
    (``--background-align word``: aligned to ``nothing``, the shipped toys) or 0 (``none``).

    Why ``none`` gives background no target at all (rather than e.g. a uniform one): real VLMs never
    tie background patches to a word, so their background tokens spread over whatever the LM makes
    of them; the shipped toys' single ``nothing`` target made 81% of the image near-duplicates of one
    word's embedding, so the text tokens those attend to most were ``?`` and ``ASSISTANT`` instead of
    the question's words (docs/results.md, SparseVLM's raters).  A uniform target would instead pull
    every background token towards one other point (the mean embedding), the same collapse.
    """
    if getattr(args, "background_align", "word") == "none":
        return torch.where(shapes > 0, 1.0, 0.0)
    return torch.where(shapes > 0, 1.0, 0.25)


def make_batch(
    v: Vocab, cache: dict, idx: list[int], rng: random.Random, turns: int, kinds: dict, sequence=build_sequence
) -> dict:
    """Padded multi-turn sequences (``sequence``: the chat format) plus, per turn, the
    answer-predicting position and the image tokens of the objects the question is about (for
    attention supervision)."""
    n_img = cache["feats"].shape[1] - 1  # column 0 is [CLS]
    all_turns = [sample_turns(cache["scenes"][i], rng, turns, kinds) for i in idx]
    seqs = [sequence(v, t, n_img) for t in all_turns]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(idx), width), v.id["<pad>"])
    labels = torch.full((len(idx), width), -100)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    qpos = torch.zeros((len(idx), turns), dtype=torch.long)
    focus = torch.zeros((len(idx), turns, n_img), dtype=torch.bool)
    named = torch.zeros((len(idx), turns, width), dtype=torch.bool)
    content = torch.tensor([v.id[w] for w in (*scenes.COLOR_NAMES, *scenes.SHAPES)])
    shapes = cache["shapes"][idx].long()
    for row, ((s, lab), tt) in enumerate(zip(seqs, all_turns, strict=True)):
        ids[row, : len(s)] = torch.tensor(s)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(s)] = 1
        answer_at = [p for p, t in enumerate(lab) if t not in (-100, v.id["</s>"])]
        qpos[row] = torch.tensor(answer_at) - 1
        for j, t in enumerate(tt):
            focus[row, j] = torch.isin(shapes[row], torch.tensor(t[3]))
            start = IMAGE_START + n_img if j == 0 else int(qpos[row, j - 1]) + 3
            span = torch.arange(start, int(qpos[row, j]))
            named[row, j, span] = torch.isin(ids[row, span], content)
    return {
        "ids": ids,
        "labels": labels,
        "mask": mask,
        "qpos": qpos,
        "focus": focus,
        "named": named,
        "feats": cache["feats"][idx, 1:].float(),
        "cls": cache["feats"][idx, :1].float(),
        "colors": cache["colors"][idx],
        "shapes": cache["shapes"][idx],
        "grid": cache.get("grid"),
    }


class AttentionProbe:
    """Captures one Llama layer's attention inputs so one head's attention from chosen query
    positions can be recomputed (training-only attention supervision)."""

    def __init__(self, layer: nn.Module):
        self.attn = layer.self_attn
        self.inputs: dict = {}
        self.handle = self.attn.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs):
        self.inputs = {"h": kwargs.get("hidden_states", args[0] if args else None), "pe": kwargs["position_embeddings"]}

    def head_attention(self, head: int, qpos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, n_query, T)`` attention probabilities of ``head`` at positions ``qpos``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        a, h = self.attn, self.inputs["h"]
        d = a.head_dim
        q = a.q_proj(h)[..., head * d : (head + 1) * d].unsqueeze(1)
        kv_head = head // (a.config.num_attention_heads // a.config.num_key_value_heads)
        k = a.k_proj(h)[..., kv_head * d : (kv_head + 1) * d].unsqueeze(1)
        cos, sin = self.inputs["pe"]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q = q[:, 0].gather(1, qpos.unsqueeze(-1).expand(-1, -1, d))
        scores = q @ k[:, 0].transpose(1, 2) * a.scaling
        t = torch.arange(h.shape[1])
        allowed = (t[None, None, :] <= qpos[:, :, None]) & mask[:, None, :].bool()
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def drop_image_tokens(batch: dict, rng: random.Random, p_drop: float) -> None:
    """Token-drop augmentation, in place: for a fraction ``p_drop`` of the sequences, hide all
    but 8-80 image tokens from attention (a uniform subset, or one biased towards object
    patches, as compression methods produce), so the LM does not lean on background patches
    (e.g. as attention sinks) and answers from whatever object tokens remain."""
    shapes = batch["shapes"]
    n_img = shapes.shape[1]
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    keep = torch.ones(shapes.shape, dtype=torch.bool)
    for row in range(shapes.shape[0]):
        if rng.random() >= p_drop:
            continue
        score = torch.rand(n_img, generator=gen)
        if rng.random() < 0.5:
            score = score + (shapes[row] > 0).float() * rng.uniform(0.3, 1.0)
        keep[row] = False
        keep[row, score.topk(rng.randint(8, 80)).indices] = True
    batch["mask"][:, IMAGE_START : IMAGE_START + n_img] = keep.long()
    batch["focus"] = batch["focus"] & keep[:, None, :]


def stage2_forward(
    model, v: Vocab, batch: dict, args: argparse.Namespace, qa: bool, probe=None, copy_probe=None
) -> dict:
    """Losses of stage 2: alignment of image tokens with their words, QA, attention supervision."""
    lm, fam = model.model.language_model, layout(args)
    n_img = batch["feats"].shape[1]
    embeds = lm.embed_tokens(batch["ids"])
    img = fam.project(model, batch["feats"])
    embeds = torch.cat([embeds[:, :IMAGE_START], img, embeds[:, IMAGE_START + n_img :]], 1)
    out = lm(inputs_embeds=embeds, attention_mask=batch["mask"], position_ids=fam.positions(batch),
             output_hidden_states=True)
    span = slice(IMAGE_START, IMAGE_START + n_img)
    target = align_targets(v, batch["colors"], batch["shapes"], model.lm_head.out_features)
    weight = align_weights(batch["shapes"], args)
    align = 0.0
    for h in (lm.norm(out.hidden_states[args.align_layer][:, span]), out.last_hidden_state[:, span]):
        ce = -(target * F.log_softmax(model.lm_head(h), -1)).sum(-1)
        align = align + (ce * weight).sum() / weight.sum()
    result = {"align": align, "loss": align}
    if qa:
        focus_seq = torch.zeros(batch["named"].shape, dtype=torch.bool)
        focus_seq[:, :, span] = batch["focus"]
        qa_losses(model, out, batch["labels"], batch["qpos"], batch["mask"], focus_seq, batch["named"], args, result,
                  probe, copy_probe)
    return result


def qa_losses(model, out, labels, qpos, mask, focus_seq, named, args, result: dict, probe=None, copy_probe=None):
    """Add the answer loss and the attention supervision to ``result`` (in place).

    ``focus_seq`` ``[B, turns, T]`` marks, per question, the sequence positions of the image
    tokens it is about; ``named`` the positions of the question's color/shape words.
    """
    logits = model.lm_head(out.last_hidden_state[:, :-1])
    labels = labels[:, 1:]
    result["qa"] = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    result["loss"] = result["qa"] + args.align_weight * result["align"]
    keep = labels != -100
    result["pred"], result["gold"] = logits.argmax(-1)[keep], labels[keep]
    if probe is not None and args.attn_weight > 0:
        att = probe.head_attention(0, qpos, mask)
        mass = (att * focus_seq).sum(-1)[focus_seq.any(-1)]
        result["attn"] = -(mass + 1e-6).log().mean()
        result["attn_mass"] = mass.mean().detach()
        result["loss"] = result["loss"] + args.attn_weight * result["attn"]
    if copy_probe is not None and args.attn_weight > 0:
        # One layer earlier, head 0 gathers the question's color/shape words at the
        # answer position, so the look-up head above knows what to look for.
        att = copy_probe.head_attention(0, qpos, mask)
        has = named.any(-1)
        mass = (att * named).sum(-1)[has]
        result["copy_mass"] = mass.mean().detach()
        result["loss"] = result["loss"] - args.attn_weight * (mass + 1e-6).log().mean()


@torch.no_grad()
def stage2_eval(model, v: Vocab, cache: dict, args: argparse.Namespace) -> dict:
    """Teacher-forced single-turn accuracy per kind on the held-out cached images."""
    model.eval()
    rng = random.Random(f"{args.seed}-stage2-val")
    hits: dict[str, list[float]] = {}
    for kind in scenes.ALL_KINDS:
        val = [i for i in range(args.n_cache, args.n_cache + args.n_val) if scenes.can_ask(cache["scenes"][i], kind)]
        for start in range(0, len(val), 64):
            idx = val[start : start + 64]
            batch = make_batch(v, cache, idx, rng, 1, {kind: 1.0}, layout(args).sequence)
            res = stage2_forward(model, v, batch, args, qa=True)
            answers = res["pred"].view(len(idx), 2)[:, 0] == res["gold"].view(len(idx), 2)[:, 0]
            hits.setdefault(kind, []).extend(answers.float().tolist())
    model.train()
    return {k: round(float(np.mean(h)), 4) for k, h in hits.items()}


def stage3_forward(model, v: Vocab, batch: dict, phys: dict, args: argparse.Namespace, probe=None, copy_probe=None):
    """Stage-3 losses on shortened sequences (``toy_shorten.apply_specs``): image tokens are
    ``projector(W @ features)`` or ``W @ projector(features)`` over [CLS] + patches."""
    lm, fam = model.model.language_model, layout(args)
    feats = torch.cat([batch["cls"], batch["feats"]], 1)
    w = phys["w"]
    post = w @ fam.project(model, feats)
    img = (torch.where(phys["pre"][:, None, None], fam.project(model, w @ feats), post) if phys["pre"].any()
           else post)[phys["valid"]]
    embeds = lm.embed_tokens(phys["ids"]).masked_scatter(phys["slots"].unsqueeze(-1), img)
    out = lm(inputs_embeds=embeds, attention_mask=phys["mask"], position_ids=phys["positions"],
             output_hidden_states=True)
    # Alignment of each image token with the words of what it shows (merged: the mean target).
    vocab = model.lm_head.out_features
    target = align_targets(v, batch["colors"], batch["shapes"], vocab)
    target = torch.cat([torch.zeros(target.shape[0], 1, vocab), target], 1)
    weight = torch.cat([torch.zeros(w.shape[0], 1), align_weights(batch["shapes"], args)], 1)
    wn = w / w.sum(-1, keepdim=True).clamp(min=1e-9)
    if getattr(args, "background_align", "word") == "none":
        # Background members carry no target: a merged token's target is the weighted mean of its
        # object members' targets (its weight, below, their share of the token).
        target = (wn * (weight > 0).unsqueeze(1)) @ target
        target = (target / target.sum(-1, keepdim=True).clamp(min=1e-9))[phys["valid"]]
    else:
        target = (wn @ target)[phys["valid"]]
    weight = (wn @ weight.unsqueeze(-1)).squeeze(-1)[phys["valid"]] * phys["mask"][phys["slots"]]
    align = 0.0
    for h in (lm.norm(out.hidden_states[args.align_layer][phys["slots"]]), out.last_hidden_state[phys["slots"]]):
        ce = -(target * F.log_softmax(model.lm_head(h), -1)).sum(-1)
        align = align + (ce * weight).sum() / weight.sum().clamp(min=1e-9)
    result = {"align": align, "loss": align}
    qa_losses(model, out, phys["labels"], phys["qpos"], phys["mask"], phys["focus_seq"], phys["named"], args, result,
              probe, copy_probe)
    return result


def shortened(v: Vocab, batch: dict, rng: random.Random, mix: dict, fam=None, **fixed) -> dict:
    """The physical batch of ``batch`` with each row rewritten by ``toy_shorten.row_spec``
    (``fam``: the family's :class:`LlavaLayout`, which adds the grid and the positions)."""
    fam = fam or LlavaLayout()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    specs = [
        toy_shorten.row_spec(rng, gen, batch["feats"][r], batch["shapes"][r], mix, **fam.row_kwargs(batch), **fixed)
        for r in range(batch["feats"].shape[0])
    ]
    phys = toy_shorten.apply_specs(batch, specs, v.id["<image>"], v.id["<pad>"])
    phys["positions"] = fam.shortened_positions(phys, specs, batch)
    return phys


# Conditions of the stage-3 check: kept count, kind and position rule fixed per condition.
STAGE3_CHECKS = {
    "full": {"kind": "full"},
    "random16_compact": {"kind": "subset", "k": 16, "biased": False, "keep_positions": False},
    "random16_kept": {"kind": "subset", "k": 16, "biased": False, "keep_positions": True},
    "random48_compact": {"kind": "subset", "k": 48, "biased": False, "keep_positions": False},
    "object16_compact": {"kind": "subset", "k": 16, "biased": True, "keep_positions": False},
    "merge16_compact": {"kind": "merge", "k": 16, "biased": True, "keep_positions": False, "pre": True},
    "visionzip16": {"kind": "visionzip", "k": 16},
    "pool36": {"kind": "pool", "k": 36, "keep_positions": False, "pre": True},
}


@torch.no_grad()
def stage3_eval(model, v: Vocab, cache: dict, args: argparse.Namespace) -> dict:
    """Teacher-forced first-answer accuracy on the held-out cached images, per condition."""
    model.eval()
    val = list(range(args.n_cache, args.n_cache + args.n_val))
    kinds = {k: 1.0 for k in scenes.REQUIRED_KINDS}
    result = {}
    for name, fixed in layout(args).stage3_checks.items():
        rng = random.Random(f"{args.seed}-stage3-val")  # same questions for every condition
        hits = []
        for start in range(0, len(val), 64):
            idx = val[start : start + 64]
            batch = make_batch(v, cache, idx, rng, 1, kinds, layout(args).sequence)
            res = stage3_forward(model, v, batch, shortened(v, batch, rng, {}, layout(args), **fixed), args)
            hits.extend((res["pred"].view(len(idx), 2)[:, 0] == res["gold"].view(len(idx), 2)[:, 0]).tolist())
        result[name] = round(float(np.mean(hits)), 4)
    model.train()
    return result


def run_lm_stage(args: argparse.Namespace, model, v: Vocab, cache: dict, stage: str) -> dict:
    """Train the projector and the LM: ``stage2`` (alignment, then QA with tokens hidden by
    the mask) or ``stage3`` (QA on shortened sequences, from stage 2's weights)."""
    path = args.work / f"{stage}.pt"
    ck = load_ckpt(path)
    fam = layout(args)
    modules = nn.ModuleList([fam.projector(model), model.model.language_model])
    if finished(ck, stage, modules, "modules"):
        return ck["metrics"]
    s2 = stage == "stage2"
    total, base_lr, warmup = (args.stage2_steps, args.lr2, 100) if s2 else (args.stage3_steps, args.lr3, 50)
    evaluate = functools.partial(fam.evaluate, stage2_eval if s2 else stage3_eval)
    mix = dict(zip(SHORTEN_KINDS, args.shorten_mix, strict=True))
    opt = torch.optim.AdamW(modules.parameters(), lr=base_lr, betas=(0.9, 0.98), weight_decay=0.01)
    step = 0
    if ck is not None:
        modules.load_state_dict(ck["modules"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        log(f"{stage}: resumed at step {step}/{total}")
    elif not s2:
        log(f"stage3: before training, val (teacher-forced): {evaluate(model, v, cache, args)}")
    model.train()

    def snapshot(done: bool = False, metrics: dict | None = None) -> None:
        save_atomic(
            {"modules": modules.state_dict(), "opt": opt.state_dict(), "step": step, "done": done, "metrics": metrics},
            path,
        )

    probe = AttentionProbe(model.model.language_model.layers[args.attn_layer])
    copy_probe = AttentionProbe(model.model.language_model.layers[args.attn_layer - 1])
    eos = v.id["</s>"]
    t0, last_save = time.time(), time.time()
    hist: dict[str, list[float]] = {"loss": [], "qa": [], "align": [], "acc": [], "mass": [], "copy": []}
    n0 = step
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, base_lr, warmup)
        rng = batch_rng(args.seed, "s2" if s2 else "s3", step)
        idx = rng.sample(range(args.n_cache), args.batch2)
        qa = not s2 or step >= args.align_steps
        batch = make_batch(v, fam.cache_for(cache, rng), idx, rng, args.turns, KIND_WEIGHTS, fam.sequence)
        if s2:
            if qa and step >= args.drop_from:
                drop_image_tokens(batch, rng, args.drop_prob)
            res = stage2_forward(model, v, batch, args, qa=qa, probe=probe, copy_probe=copy_probe)
        else:
            phys = shortened(v, batch, rng, mix, fam)
            res = stage3_forward(model, v, batch, phys, args, probe=probe, copy_probe=copy_probe)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        step += 1
        hist["loss"].append(res["loss"].item())
        hist["align"].append(float(res["align"].detach()))
        if qa:
            hist["qa"].append(res["qa"].item())
            is_answer = res["gold"] != eos
            hist["acc"].append((res["pred"] == res["gold"])[is_answer].float().mean().item())
            hist["mass"].append(float(res.get("attn_mass", 0.0)))
            hist["copy"].append(float(res.get("copy_mass", 0.0)))
        if step % 20 == 0:
            rate = (time.time() - t0) / (step - n0)
            qa_txt = (
                f" qa {np.mean(hist['qa'][-20:]):.4f} answer-acc {np.mean(hist['acc'][-20:]):.3f}"
                f" attn-mass {np.mean(hist['mass'][-20:]):.3f} copy-mass {np.mean(hist['copy'][-20:]):.3f}"
                if qa
                else ""
            )
            log(
                f"{stage} step {step}/{total} align {np.mean(hist['align'][-20:]):.4f}{qa_txt} "
                f"{rate:.2f}s/step eta {rate * (total - step) / 60:.1f} min"
            )
        if step % args.eval_every == 0 and qa:
            log(f"{stage} val (teacher-forced): {evaluate(model, v, cache, args)}")
        if time.time() - last_save > args.save_every:
            snapshot()
            last_save = time.time()
    probe.handle.remove()
    copy_probe.handle.remove()
    metrics = evaluate(model, v, cache, args)
    log(f"{stage} final val (teacher-forced): {metrics}")
    snapshot(done=True, metrics=metrics)
    return metrics


# ------------------------------------------------------------------------------ final


@torch.no_grad()
def crude_budget_check(model, processor, records: list, keep: int = 16, batch_size: int = 25) -> dict:
    """Rough preview of the compression bars, NOT the methods: hide all but ``keep`` image
    tokens from the LM's attention (random, or top [CLS] attention of the feature layer of
    the vision tower) and score the first answer token.  Returns accuracy per selection."""
    tower = model.model.vision_tower
    old_impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    hits: dict[str, list[bool]] = {"full": [], "random": [], "cls": []}
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            enc = processor(
                images=[r.image for r in batch],
                text=[toy.prompt(processor, r.question) for r in batch],
                padding=True,
                return_tensors="pt",
            )
            vision = tower(enc["pixel_values"], output_attentions=True)
            cls_att = vision.attentions[model.config.vision_feature_layer][:, :, 0, 1:].mean(1)
            image_pos = enc["input_ids"] == processor.image_token_id
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            for how in hits:
                mask = enc["attention_mask"].clone()
                for row in range(len(batch)):
                    if how == "full":
                        continue
                    n = cls_att.shape[1]
                    chosen = (
                        torch.randperm(n, generator=gen)[:keep] if how == "random" else cls_att[row].topk(keep).indices
                    )
                    kept = torch.zeros(n, dtype=mask.dtype)
                    kept[chosen] = 1
                    mask[row, image_pos[row]] = kept
                inputs = {**enc, "attention_mask": mask, "position_ids": positions}
                logits = model(**inputs).logits[:, -1]
                words = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
                hits[how].extend(w == r.answer for w, r in zip(words, batch, strict=True))
    finally:
        tower.config._attn_implementation = old_impl
    return {how: sum(h) / len(h) for how, h in hits.items()}


def write_results(path: Path, result: dict, crude: dict, keep: int) -> None:
    """Replace the results block of docs/toy-benchmark.md with the measured numbers."""
    if not path.exists():
        return
    lines = ["<!-- results:start (written by scripts/train_toy.py) -->", ""]
    for name, res in result.items():
        kinds = " | ".join(f"{k} {v:.1%}" for k, v in res["per_kind"].items())
        lines.append(f"* {name} kinds, {res['n']} questions, seed {toy.EVAL_SEED}: **{res['overall']:.1%}** ({kinds})")
    lines += [
        "",
        f"Crude preview of the compression bars (first answer token, {crude['n']} questions, not the methods:",
        f"image tokens outside the kept {keep} of 144 = 11% are hidden from the LM with the attention mask):",
        f"full {crude['full']:.1%}, random {keep} {crude['random']:.1%}, "
        f"[CLS]-attention top-{keep} {crude['cls']:.1%}.",
        "",
        "<!-- results:end -->",
    ]
    text = path.read_text()
    start, end = text.find("<!-- results:start"), text.find("<!-- results:end -->")
    if start < 0 or end < 0:
        return
    path.write_text(text[:start] + "\n".join(lines) + text[end + len("<!-- results:end -->") :])


def save_hub_layout(model, model_dir: Path) -> None:
    """``save_pretrained`` in the layout of the LLaVA checkpoints on the hub (``vision_tower.vision_model.*``).

    A model built from a config saves its CLIP tower's keys without ``vision_model.`` (transformers
    5.x drops that prefix on load and restores it on save only for models it loaded that way);
    vLLM's LLaVA loader and other tools read the hub's names, and transformers loads both, to the
    same bits (tests/test_serve.py)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(model_dir)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    flat, hub = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        (hub + k[len(flat) :] if k.startswith(flat) and not k.startswith(hub) else k): v for k, v in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def run_final(args: argparse.Namespace, model, processor) -> dict:
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 3
    model.generation_config.do_sample = False
    args.model_dir.mkdir(parents=True, exist_ok=True)
    save_hub_layout(model, args.model_dir)
    processor.save_pretrained(args.model_dir)
    size = sum(f.stat().st_size for f in args.model_dir.iterdir())
    log(f"saved model + processor to {args.model_dir} ({size / 1e6:.1f} MB)")
    loaded, proc = toy.load(args.model_dir)
    result = {}
    style = args.scene_style  # held-out questions of the style the model was trained on
    for name, kinds in (("required", scenes.REQUIRED_KINDS), ("extras", scenes.EXTRA_KINDS)):
        t0 = time.time()
        result[name] = toy.evaluate(loaded, proc, toy.generate(args.n_eval, toy.EVAL_SEED, kinds=kinds, style=style))
        log(f"held-out seed {toy.EVAL_SEED}, {style} scenes, {name}: {result[name]} ({time.time() - t0:.0f}s)")
    crude = crude_budget_check(loaded, proc, toy.generate(args.n_eval, toy.EVAL_SEED, style=style), keep=16)
    crude["n"] = args.n_eval
    crude["style"] = style
    log(f"crude 16-token preview (not the methods): {crude}")
    (args.work / "final_eval.json").write_text(json.dumps({**result, "crude_keep16": crude}, indent=2))
    if args.model_dir.resolve() == toy.MODEL_PATH.resolve():
        write_results(ROOT / "docs" / "toy-benchmark.md", result, crude, 16)
    return result


def init_from(args: argparse.Namespace, model) -> None:
    """Write finished stage-1 and stage-2 checkpoints from a saved toy model (once), so that
    stage 3 fine-tunes it: how toy v2 was made from the shipped v1."""
    from transformers import LlavaForConditionalGeneration

    if (args.work / "stage1.pt").exists() or (args.work / "stage2.pt").exists():
        return
    src = LlavaForConditionalGeneration.from_pretrained(args.init_from)
    metrics = {"init_from": str(args.init_from)}
    save_atomic({"tower": src.model.vision_tower.state_dict(), "done": True, "metrics": metrics},
                args.work / "stage1.pt")
    modules = nn.ModuleList([src.model.multi_modal_projector, src.model.language_model])
    save_atomic({"modules": modules.state_dict(), "done": True, "metrics": metrics}, args.work / "stage2.pt")
    log(f"stages 1 and 2 taken from {args.init_from}")


class LlavaLayout:
    """What the training stages need to know about the model family (scripts/train_toy_qwen.py
    has the Qwen2.5-VL one): the stage-1 data and losses, the chat format, how cached tower
    features become image tokens, their positions, and which cache a batch draws from."""

    sequence = staticmethod(build_sequence)
    stage3_checks = STAGE3_CHECKS
    stage1_forward = staticmethod(stage1_forward)
    style = "flat"  # the scenes' background style (scenes.STYLES)

    def __init__(self, style: str = "flat"):
        self.style = style

    def stage1_batch(self, rng: random.Random, n: int) -> tuple[torch.Tensor, ...]:
        return stage1_batch(rng, n, self.style)

    def stage1_eval(self, tower: nn.Module, heads: Stage1Heads, seed: int, n: int = 384) -> dict:
        return stage1_eval(tower, heads, seed, n, self.style)

    def stage1_heads(self, tower: nn.Module) -> Stage1Heads:
        return Stage1Heads(tower.config.hidden_size)

    def projector(self, model) -> nn.Module:
        return model.model.multi_modal_projector

    def project(self, model, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(model)(feats)

    def positions(self, batch: dict) -> torch.Tensor | None:
        return None  # 1-D positions from the attention mask, as the model numbers them

    def row_kwargs(self, batch: dict) -> dict:
        return {}

    def shortened_positions(self, phys: dict, specs: list, batch: dict) -> torch.Tensor:
        return phys["positions"]

    def cache_for(self, cache: dict, rng: random.Random) -> dict:
        return cache

    def evaluate(self, fn, model, v: Vocab, cache: dict, args: argparse.Namespace) -> dict:
        return fn(model, v, cache, args)


def layout(args: argparse.Namespace) -> LlavaLayout:
    """The family layout of this run (LLaVA unless a sibling script set ``args.layout``)."""
    return getattr(args, "layout", None) or LlavaLayout(getattr(args, "scene_style", "flat"))


def check_model_dir(args: argparse.Namespace) -> None:
    """Refuse to write a model of other data or shape over a shipped toy (toy v3 goes to a new folder)."""
    shipped = {toy.MODEL_PATH.resolve(), toy.QWEN_MODEL_PATH.resolve()}
    other = args.scene_style != "flat" or args.background_align != "word" or args.text_layers != 8
    if other and args.model_dir.resolve() in shipped:
        raise SystemExit(
            f"--model-dir {args.model_dir} is a shipped toy; give a new folder for --scene-style/--background-align/"
            "--text-layers other than the defaults (e.g. --model-dir eval/toy/model-v3)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "toy", help="checkpoints and caches")
    p.add_argument("--model-dir", type=Path, default=toy.MODEL_PATH, help="where the final model is saved")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-layers", type=int, default=5)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=8, help="LM layers (toy v3: 16)")
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument(
        "--scene-style", choices=scenes.STYLES, default="flat",
        help="scene backgrounds of every stage and of the final evaluation (toy v3: textured)",
    )
    p.add_argument(
        "--background-align", choices=("word", "none"), default="word",
        help="background image tokens aligned to the word 'nothing' (weight 0.25), or not at all (toy v3: none)",
    )
    p.add_argument("--stage1-steps", type=int, default=900)
    p.add_argument("--batch1", type=int, default=32)
    p.add_argument("--gate", type=float, default=0.9, help="per-patch shape accuracy (object patches) to pass")
    p.add_argument("--lr1", type=float, default=1e-3)
    p.add_argument("--cls-steps", type=int, default=300, help="stage 1b steps ([CLS] attention; 0: skip)")
    p.add_argument("--lr1b", type=float, default=3e-4)
    p.add_argument("--drift-weight", type=float, default=20.0, help="stage 1b: weight of the features' drift")
    p.add_argument("--n-cache", type=int, default=12000, help="stage-2 training images (cached features)")
    p.add_argument("--n-val", type=int, default=384)
    p.add_argument("--stage2-steps", type=int, default=2200)
    p.add_argument("--align-steps", type=int, default=150, help="alignment-only warm-up steps")
    p.add_argument("--align-layer", type=int, default=2, help="LM layer whose image tokens are also aligned")
    p.add_argument("--align-weight", type=float, default=0.3, help="alignment loss weight after warm-up")
    p.add_argument(
        "--attn-layer",
        type=int,
        default=2,
        help="LM layer whose head 0 is taught to look (head 0 of the layer below: to read the question)",
    )
    p.add_argument("--attn-weight", type=float, default=1.0, help="attention supervision weight (0: off)")
    p.add_argument("--drop-prob", type=float, default=0.5, help="share of sequences with image tokens hidden")
    p.add_argument(
        "--drop-from", type=int, default=556, help="first stage-2 step of token-drop augmentation (shipped run: 556)"
    )
    p.add_argument("--stage3-steps", type=int, default=1000, help="shortened-sequence fine-tuning steps (0: skip)")
    p.add_argument("--lr3", type=float, default=3e-4)
    p.add_argument(
        "--shorten-mix", type=lambda t: [float(x) for x in t.split(",")], default=[0.15, 0.15, 0.3, 0.2, 0.1, 0.1],
        help=f"stage-3 weights of the row kinds {','.join(SHORTEN_KINDS)}",
    )
    p.add_argument(
        "--init-from", type=Path, default=None,
        help="a saved toy model whose tower and projector+LM stand for finished stages 1 and 2",
    )
    p.add_argument("--batch2", type=int, default=16)
    p.add_argument("--turns", type=int, default=8, help="questions per image per sequence")
    p.add_argument("--lr2", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--stop-after", choices=["stage1", "stage1b", "cache", "stage2", "stage3"], default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_model_dir(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    from transformers import LlavaForConditionalGeneration

    config = build.build_config(args.vision_layers, args.vision_width, args.text_layers, args.text_width)
    model = LlavaForConditionalGeneration(config)
    processor = build.build_processor()
    log(f"args: {vars(args)}")
    log(
        f"params: vision {sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6:.2f}M, "
        f"projector+LM {sum(p.numel() for p in model.model.language_model.parameters()) / 1e6:.2f}M"
    )
    tower = model.model.vision_tower
    if args.init_from is not None:
        init_from(args, model)
    run_stage1(args, tower)
    tower.requires_grad_(False)
    if args.stop_after == "stage1":
        return
    if args.cls_steps > 0:
        run_stage1b(args, tower)
    if args.stop_after == "stage1b":
        return
    cache = run_cache(args, tower)
    if args.stop_after == "cache":
        return
    vocab = Vocab(processor.tokenizer)
    run_lm_stage(args, model, vocab, cache, "stage2")
    if args.stop_after == "stage2":
        return
    if args.stage3_steps > 0:
        run_lm_stage(args, model, vocab, cache, "stage3")
    if args.stop_after == "stage3":
        return
    run_final(args, model, processor)
    log("all done")


if __name__ == "__main__":
    main()
