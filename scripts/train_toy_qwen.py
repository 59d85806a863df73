#!/usr/bin/env python
"""Train the Qwen2.5-VL-format toy of ``vtc.eval.toy`` on CPU, resumably (the stages of train_toy.py).

The model is a ``Qwen2_5_VLForConditionalGeneration`` (``vtc.eval.toy.build_qwen``): a ViT of 7 px
patches with window attention (8x8-patch windows, full attention in two blocks) and the family's
2x2 patch merger, and a Qwen2 LM with 3-D M-RoPE, seeing the LLaVA toy's scenes at 168 and 224 px
(144 and 256 tokens). What differs from ``train_toy.py`` is in :class:`QwenLayout`:

1. ``stage1``: the tower on per-token labels (color and shape of each 14 px token, read from the
   merger's input: the 2x2 patches of the token, concatenated) and on which color-shape pairs
   the image holds (mean over its object tokens: no global target for the background), with
   head 0 of each full-attention block taught to attend from each object patch to its own object
   (:class:`TowerAttentionProbe`). No [CLS], so no stage 1b.
2. ``cache``: per image size, the frozen tower's last block output, in the raster order of the
   merged grid (``[tokens, 4 * width]``, the merger's input), float16.
3. ``stage2`` / ``stage3``: as the LLaVA toy, with the merger in the projector's place (trained
   from scratch here), Qwen's chat format, 3-D positions (image token at row r, column c of an
   image starting at s: (s, s + r, s + c); the text after it from s + max(rows, cols)), each
   batch of one image size. Stage 3's shortened rows keep their 3-D positions (the adapter's
   default) or are re-indexed as the adapter's ``compact`` does; reductions are after the merger
   (as vtc reduces Qwen), no VisionZip [CLS] rows; 65% of the rows keep their positions.
4. ``final``: save model + processor to ``--model-dir`` and score 500 held-out questions per
   size with ``generate``.

Example:
    OMP_NUM_THREADS=1 nohup setsid nice -n 5 .venv/bin/python scripts/train_toy_qwen.py \\
        --work runs/toy-qwen > runs/toy-qwen.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import toy_shorten  # scripts/toy_shorten.py, beside this file
import train_toy as tt  # scripts/train_toy.py
from torch import nn

from vtc.eval import toy
from vtc.eval.toy import build_qwen, scenes
from vtc.patches.qwen2_5_vl import Qwen2_5_VLAdapter

ROOT = Path(__file__).resolve().parents[1]
IMAGE_START = toy_shorten.IMAGE_START  # <|im_start|> user <|vision_start|> <|image_pad|>...
QWEN_MODEL_PATH = toy.QWEN_MODEL_PATH
# The defaults that differ from train_toy.py's (given first: the command line overrides them).
QWEN_DEFAULTS = [
    "--work", str(ROOT / "runs" / "toy-qwen"), "--model-dir", str(QWEN_MODEL_PATH), "--vision-layers", "4",
    # A narrower tower than the LLaVA toy's (4x its patches per image on this CPU budget).
    "--vision-width", "64", "--batch1", "16", "--stage1-steps", "1500", "--cls-steps", "0",
    "--n-cache", "4000", "--n-val", "256", "--stage2-steps", "1800", "--stage3-steps", "800", "--drop-from", "500",
    "--eval-every", "400",
    # full, mask, subset, merge, pool; no VisionZip [CLS] rows (no [CLS])
    "--shorten-mix", "0.15,0.15,0.35,0.25,0.1,0",
]
# Stage-3 check conditions (per image size; k of 144 or 256 tokens).
QWEN_STAGE3_CHECKS = {
    "full": {"kind": "full"},
    "random_1/9_kept": {"kind": "subset", "frac": 1 / 9, "biased": False, "keep_positions": True},
    "random_1/9_compact": {"kind": "subset", "frac": 1 / 9, "biased": False, "keep_positions": False},
    "object_1/9_kept": {"kind": "subset", "frac": 1 / 9, "biased": True, "keep_positions": True},
    "random_1/3_kept": {"kind": "subset", "frac": 1 / 3, "biased": False, "keep_positions": True},
    "merge_1/9_kept": {"kind": "merge", "frac": 1 / 9, "biased": True, "keep_positions": True},
    "pool_1/4_compact": {"kind": "pool", "frac": 1 / 4, "keep_positions": False},
}


def qwen_sequence(v: tt.Vocab, turns: list[tuple[str, str, str]], n_image: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except answer word and its ``<|im_end|>``) of a multi-turn chat in the
    toy's Qwen template, token for token what ``apply_chat_template`` + the processor produce."""
    i = v.id
    ids = [i["<|im_start|>"], i["user"], i["<|vision_start|>"]] + [i["<image>"]] * n_image
    labels = [-100] * len(ids)
    for t, (question, answer, *_rest) in enumerate(turns):
        head = [i["<|vision_end|>"]] if t == 0 else [i["<|im_start|>"], i["user"]]
        prompt = head + v.words(question) + [i["</s>"], i["<|im_start|>"], i["assistant"]]
        ids += prompt + [i[answer], i["</s>"]]
        labels += [-100] * len(prompt) + [i[answer], i["</s>"]]
    return ids, labels


def window_index(tower: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """The tower's order of the merged groups (its window attention's), as ``get_vision_window_index``."""
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size, patch_size=tower.patch_size
    )
    return index


def tower_tokens(
    tower: nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor, hidden: torch.Tensor | None = None
) -> torch.Tensor:
    """``[images, tokens, 4 * width]``: the last block's output (``hidden``, window order, computed unless
    given) as the merger reads it (each token's 2x2 patches concatenated), in the raster order of the
    merged grid (images of one size)."""
    if hidden is None:
        hidden = tower(pixel_values, grid_thw=grid).last_hidden_state  # window order
    unit = tower.spatial_merge_unit
    tokens = hidden.reshape(-1, unit * hidden.shape[-1])[torch.argsort(window_index(tower, grid))]
    return tokens.view(grid.shape[0], -1, tokens.shape[-1])


def patch_objects(scene: scenes.Scene, patch: int, min_cover: float = 0.3) -> np.ndarray:
    """Per tower patch (raster order), the 1-based index of the object covering most of it (at least
    ``min_cover``), else 0."""
    m = scenes.object_index_map(scene)
    g = scene.size // patch
    blocks = m[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    cover = np.stack([(blocks == i + 1).mean(1) for i in range(len(scene.objects))], 1)
    return np.where(cover.max(1) >= min_cover, cover.argmax(1) + 1, 0)


# Patch offsets (rows, cols) whose object membership each object patch predicts in stage 1.
NEIGHBOURS = [(dr * s, dc * s) for s in (2, 4) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def neighbour_targets(objects: np.ndarray, g: int) -> np.ndarray:
    """``[g * g, len(NEIGHBOURS)]`` (raster): whether the patch at each offset belongs to the same object."""
    grid = objects.reshape(g, g)
    pad = max(max(abs(r), abs(c)) for r, c in NEIGHBOURS)
    padded = np.pad(grid, pad, constant_values=-1)
    cols = [padded[pad + r : pad + r + g, pad + c : pad + c + g] == grid for r, c in NEIGHBOURS]
    return (np.stack(cols, -1) & (grid > 0)[..., None]).reshape(g * g, -1)


class QwenStage1Heads(tt.Stage1Heads):
    """Stage 1's heads: the LLaVA toy's on each token's 2x2 patches, plus a per-patch head that says
    which patches around it (``NEIGHBOURS``) belong to its object: the local outline a RoPE-only
    tower must learn to see, from which an object's patches, gathered, tell its shape."""

    def __init__(self, width: int, unit: int):
        super().__init__(unit * width)
        self.outline = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(NEIGHBOURS)))


def processor_order(rows: int, cols: int, merge: int = 2) -> torch.Tensor:
    """The raster index of each patch in the processor's order (merged blocks in raster order, the
    ``merge x merge`` patches of each block consecutive)."""
    idx = torch.arange(rows * cols).view(rows // merge, merge, cols // merge, merge)
    return idx.permute(0, 2, 1, 3).reshape(-1)


class TowerAttentionProbe:
    """Captures a tower block's attention inputs so that head 0's attention can be recomputed and
    taught (stage 1): from every object patch to the patches of the same object. A RoPE-only tower
    has no position in its values; gathering the object's patches is what lets a token know the
    shape it is part of (the CLIP tower of the LLaVA toy has absolute position embeddings)."""

    def __init__(self, block: nn.Module):
        self.attn = block.attn
        self.inputs: dict = {}
        self.handle = self.attn.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs):
        self.inputs = {"h": kwargs.get("hidden_states", args[0] if args else None),
                       "pe": kwargs["position_embeddings"], "cu": kwargs["cu_seqlens"]}

    def same_object_mass(self, objects: torch.Tensor) -> torch.Tensor:
        """Per object patch (window order, all images), head 0's attention mass on its own object."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        a, h = self.attn, self.inputs["h"]
        n = h.shape[0]
        q, k, _ = a.qkv(h).reshape(n, 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = self.inputs["pe"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q[:, 0], k[:, 0]
        bounds = self.inputs["cu"].tolist()
        masses = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            obj = objects[start:end]
            probs = (q[start:end] @ k[start:end].T * a.scaling).softmax(-1)
            same = (obj[:, None] == obj[None, :]) & (obj[:, None] > 0)
            masses.append((probs * same).sum(-1)[obj > 0])
        return torch.cat(masses)


def mrope_grid(image_start: int, grid: tuple[int, int], before: int, after: int) -> torch.Tensor:
    """``[3, before + rows * cols + after]`` positions of text, an image, text, as ``get_rope_index``."""
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    image = torch.stack([torch.zeros(rows * cols, dtype=torch.long), r.flatten(), c.flatten()]) + image_start
    text_after = image_start + max(rows, cols) + torch.arange(after)
    return torch.cat([torch.arange(before).expand(3, -1), image, text_after.expand(3, -1)], 1)


class QwenLayout(tt.LlavaLayout):
    """The Qwen2.5-VL family's stage 1, chat format, merger and 3-D positions for train_toy.py's stages."""

    sequence = staticmethod(qwen_sequence)

    def __init__(self, processor, sizes: tuple[int, ...], attn_weight: float = 1.0):
        self.processor, self.sizes, self.attn_weight = processor, sizes, attn_weight
        self.probes: list[TowerAttentionProbe] | None = None
        self.stage3_checks = {name: resolve_fracs(fixed, 144) for name, fixed in QWEN_STAGE3_CHECKS.items()}

    # ------------------------------------------------------------------ stage 1
    def stage1_heads(self, tower: nn.Module) -> tt.Stage1Heads:
        return QwenStage1Heads(tower.config.hidden_size, tower.spatial_merge_unit)

    def stage1_batch(self, rng: random.Random, n: int) -> tuple:
        size = rng.choice(self.sizes)
        scs = [scenes.make_scene(rng, size=size) for _ in range(n)]
        enc = self.processor.image_processor([scenes.render(s) for s in scs], return_tensors="pt")
        labels = [scenes.patch_labels(s) for s in scs]
        colors = torch.from_numpy(np.stack([c for c, _ in labels]))
        shapes = torch.from_numpy(np.stack([s for _, s in labels]))
        pairs = torch.from_numpy(np.stack([tt.pair_targets(s) for s in scs]))
        g = size // build_qwen.PATCH
        order = processor_order(g, g).numpy()
        per_patch = [patch_objects(s, build_qwen.PATCH) for s in scs]
        objects = torch.from_numpy(np.stack([o[order] for o in per_patch]))
        outline = torch.from_numpy(np.stack([neighbour_targets(o, g)[order] for o in per_patch])).float()
        return enc["pixel_values"], enc["image_grid_thw"], colors, shapes, pairs, objects, outline

    def stage1_forward(self, tower: nn.Module, heads: tt.Stage1Heads, batch: tuple) -> tuple:
        x, grid, colors, shapes, pairs, objects, outline = batch
        if self.probes is None:
            self.probes = [TowerAttentionProbe(tower.blocks[i]) for i in tower.fullatt_block_indexes]
        hidden = tower(x, grid_thw=grid).last_hidden_state  # window order
        feats = tower_tokens(tower, x, grid, hidden)
        tokens = heads.norm(feats)
        c_logits, s_logits = heads.color(tokens), heads.shape(tokens)
        w = torch.where(shapes > 0, 3.0, 1.0)  # object tokens are the minority
        dense = (F.cross_entropy(c_logits.transpose(1, 2), colors, reduction="none") * w).mean()
        dense = dense + (F.cross_entropy(s_logits.transpose(1, 2), shapes, reduction="none") * w).mean()
        # Pairs from the object tokens only: a mean over every token taught the background to carry
        # the objects (the first model answered 80% of the questions whose object had been dropped).
        on = (shapes > 0).unsqueeze(-1).to(feats.dtype)
        pooled = (feats * on).sum(1) / on.sum(1).clamp(min=1)
        pair = F.binary_cross_entropy_with_logits(heads.cls_last(pooled), pairs)
        pair = pair + F.binary_cross_entropy_with_logits(heads.cls_feat(pooled), pairs)
        order, unit = window_index(tower, grid), tower.spatial_merge_unit
        objects = objects.reshape(-1, unit)[order].flatten()  # the tower's window order
        outline = outline.reshape(-1, unit, outline.shape[-1])[order].flatten(0, 1)
        on_object = objects > 0
        logits = heads.outline(hidden)[on_object]
        shape_of = F.binary_cross_entropy_with_logits(logits, outline[on_object])
        self.last_outline = float(((logits > 0) == (outline[on_object] > 0.5)).float().mean())
        masses = [probe.same_object_mass(objects) for probe in self.probes]
        self.last_mass = float(torch.cat(masses).detach().mean())
        attn = torch.stack([-(m + 1e-6).log().mean() for m in masses]).mean()
        return dense + pair + shape_of + self.attn_weight * attn, c_logits, s_logits

    @torch.no_grad()
    def stage1_eval(self, tower: nn.Module, heads: tt.Stage1Heads, seed: int, n: int = 384) -> dict:
        tower.eval()
        rng = random.Random(f"{seed}-stage1-val")
        stats: dict[str, list[float]] = {"color_obj": [], "shape_obj": [], "bg": [], "same_object_attn": [],
                                         "outline": []}
        for _ in range(max(1, n // 32)):
            batch = self.stage1_batch(rng, 32)
            _, c_logits, s_logits = self.stage1_forward(tower, heads, batch)
            colors, shapes = batch[2], batch[3]
            obj = shapes > 0
            stats["color_obj"].append((c_logits.argmax(-1) == colors)[obj].float().mean().item())
            stats["shape_obj"].append((s_logits.argmax(-1) == shapes)[obj].float().mean().item())
            stats["bg"].append((s_logits.argmax(-1) == shapes)[~obj].float().mean().item())
            stats["same_object_attn"].append(self.last_mass)
            stats["outline"].append(self.last_outline)
        tower.train()
        return {k: round(float(np.mean(v)), 4) for k, v in stats.items()}

    # ------------------------------------------------------------------ stages 2 and 3
    def projector(self, model) -> nn.Module:
        return model.model.visual.merger

    def project(self, model, feats: torch.Tensor) -> torch.Tensor:
        merger = self.projector(model)
        width = merger.ln_q.weight.shape[0]
        return merger(feats.reshape(-1, width)).view(*feats.shape[:-1], -1)

    def positions(self, batch: dict) -> torch.Tensor:
        b, t = batch["ids"].shape
        rows, cols = batch["grid"]
        pos = mrope_grid(IMAGE_START, (rows, cols), IMAGE_START, t - IMAGE_START - rows * cols)
        return pos[:, None].expand(3, b, t)

    def row_kwargs(self, batch: dict) -> dict:
        # vtc reduces Qwen after the merger, and its survivors keep their positions by default.
        return {"grid": tuple(batch["grid"]), "pre": False, "keep_share": 0.65}

    def shortened_positions(self, phys: dict, specs: list, batch: dict) -> torch.Tensor:
        rows, cols = batch["grid"]
        b, t = phys["ids"].shape
        out = torch.zeros(3, b, t, dtype=torch.long)
        for r, spec in enumerate(specs):
            k = len(spec.pos)
            r_, c_ = spec.pos // cols, spec.pos % cols
            image = torch.stack([torch.zeros(k, dtype=torch.long), r_, c_]) + IMAGE_START
            after = IMAGE_START + max(rows, cols) + torch.arange(t - IMAGE_START - k)
            pos = torch.cat([torch.arange(IMAGE_START).expand(3, -1), image, after.expand(3, -1)], 1)
            if not spec.keep_positions:
                is_image = torch.zeros(1, t, dtype=torch.bool)
                is_image[0, IMAGE_START : IMAGE_START + k] = True
                # Rows hidden by the mask (kind "mask") are still there: they keep the grid.
                present = (phys["mask"][r : r + 1] > 0) | phys["slots"][r : r + 1]
                pos, _ = Qwen2_5_VLAdapter.compact_positions(pos[:, None], is_image, present)
                pos = pos[:, 0]
            out[:, r] = pos
        return out

    def cache_for(self, cache: dict, rng: random.Random) -> dict:
        return cache[rng.choice(sorted(cache))]

    def evaluate(self, fn, model, v: tt.Vocab, cache: dict, args: argparse.Namespace) -> dict:
        out = {}
        for size in sorted(cache):
            n = cache[size]["feats"].shape[1] - 1
            self.stage3_checks = {name: resolve_fracs(fixed, n) for name, fixed in QWEN_STAGE3_CHECKS.items()}
            out.update({f"{name}@{size}": acc for name, acc in fn(model, v, cache[size], args).items()})
        return out


def resolve_fracs(fixed: dict, n: int) -> dict:
    """A check condition with its ``frac`` of ``n`` tokens as ``k`` (pool: the side of the grid)."""
    fixed = dict(fixed)
    frac = fixed.pop("frac", None)
    if frac is not None:
        fixed["k"] = max(1, round(n * frac))
    return fixed


@torch.no_grad()
def run_cache(args: argparse.Namespace, tower: nn.Module, processor) -> dict:
    """``{size: cache}``: per image size, ``n_cache + n_val`` scenes and their tower tokens (a zero [CLS]
    column first, so the LLaVA toy's batch code applies)."""
    caches = {}
    for size in args.sizes:
        path = args.work / f"features-{size}.pt"
        if path.exists():
            cache = torch.load(path, weights_only=False)
            if cache["n"] == args.n_cache + args.n_val:
                caches[size] = cache
                continue
        tower.eval()
        rng = random.Random(f"{args.seed}-stage2-scenes-{size}")
        n = args.n_cache + args.n_val
        feats, colors, shapes, all_scenes = [], [], [], []
        t0 = time.time()
        for start in range(0, n, 32):
            scs = [scenes.make_scene(rng, size=size) for _ in range(min(32, n - start))]
            enc = processor.image_processor([scenes.render(s) for s in scs], return_tensors="pt")
            tokens = tower_tokens(tower, enc["pixel_values"], enc["image_grid_thw"])
            feats.append(torch.cat([torch.zeros_like(tokens[:, :1]), tokens], 1).to(torch.float16))
            labels = [scenes.patch_labels(s) for s in scs]
            colors.append(torch.from_numpy(np.stack([c for c, _ in labels])).to(torch.int8))
            shapes.append(torch.from_numpy(np.stack([s for _, s in labels])).to(torch.int8))
            all_scenes.extend(scs)
            if (start // 32) % 40 == 0:
                tt.log(f"cache {size}px {start + len(scs)}/{n} ({time.time() - t0:.0f}s)")
        grid = (size // 14, size // 14)
        cache = {"n": n, "grid": grid, "feats": torch.cat(feats), "colors": torch.cat(colors),
                 "shapes": torch.cat(shapes), "scenes": all_scenes}
        tt.save_atomic(cache, path)
        tt.log(f"cache {size}px: {n} images in {time.time() - t0:.0f}s")
        caches[size] = cache
    return caches


def run_final(args: argparse.Namespace, model, processor) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    model.eval()
    tok = processor.tokenizer
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_id, None
    gc.max_new_tokens, gc.do_sample = 3, False
    args.model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.model_dir)
    processor.save_pretrained(args.model_dir)
    size = sum(f.stat().st_size for f in args.model_dir.iterdir())
    tt.log(f"saved model + processor to {args.model_dir} ({size / 1e6:.1f} MB)")
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    proc = Qwen2_5_VLProcessor.from_pretrained(args.model_dir)
    result = {}
    for name, sizes in (("168", (168,)), ("224", (224,)), ("mixed", tuple(args.sizes))):
        t0 = time.time()
        result[name] = toy.evaluate(loaded, proc, toy.generate(args.n_eval, toy.EVAL_SEED, sizes=sizes))
        tt.log(f"held-out seed {toy.EVAL_SEED}, sizes {sizes}: {result[name]} ({time.time() - t0:.0f}s)")
    (args.work / "final_eval.json").write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--sizes", type=lambda t: tuple(int(x) for x in t.split(",")), default=build_qwen.SIZES,
                   help="square image sizes in px, multiples of 14 (default 168,224)")
    p.add_argument("--vision-heads", type=int, default=None, help="tower heads (default: width / 32)")
    own, rest = p.parse_known_args(argv)
    args = tt.parse_args(QWEN_DEFAULTS + rest)
    args.sizes, args.vision_heads = own.sizes, own.vision_heads
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_qwen.build_config(args.vision_layers, args.vision_width, args.text_layers, args.text_width,
                                     args.vision_heads)
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = build_qwen.build_processor()
    args.layout = QwenLayout(processor, args.sizes)
    tt.log(f"args: {vars(args)}")
    tower = model.model.visual
    tt.log(
        f"params: vision {sum(p.numel() for n, p in tower.named_parameters() if 'merger' not in n) / 1e6:.2f}M, "
        f"merger+LM {(sum(p.numel() for p in tower.merger.parameters()) + sum(p.numel() for p in model.model.language_model.parameters())) / 1e6:.2f}M"  # noqa: E501
    )
    tt.run_stage1(args, tower)
    tower.requires_grad_(False)
    tower.merger.requires_grad_(True)  # the merger is the projector: trained with the LM
    if args.stop_after in ("stage1", "stage1b"):
        return
    cache = run_cache(args, tower, processor)
    if args.stop_after == "cache":
        return
    vocab = tt.Vocab(processor.tokenizer, words=build_qwen.vocabulary(), aliases=build_qwen.ALIASES)
    tt.run_lm_stage(args, model, vocab, cache, "stage2")
    if args.stop_after == "stage2":
        return
    if args.stage3_steps > 0:
        tt.run_lm_stage(args, model, vocab, cache, "stage3")
    if args.stop_after == "stage3":
        return
    run_final(args, model, processor)
    tt.log("all done")


if __name__ == "__main__":
    main()
