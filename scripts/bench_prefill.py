"""Prefill benchmark: a method's wall-clock time against the *ideal* time for the same
per-layer token counts, on a LLaVA-1.5-shaped (576 visual tokens) or LLaVA-NeXT-shaped
(one 672x672 image: 2,928 tokens) or LLaVA-OneVision-shaped (one 768x768 image: 3,699 tokens; or
``--video`` frames of 196 tokens each) or Qwen2.5-VL-7B / Qwen3-VL-8B-shaped (one image of 1,024 tokens:
896x896 / 1024x1024 pixels) model of reduced width (random weights).

For the unpatched model and each method at each budget it prints: prefill time (median of
interleaved rounds), the ideal time (the vision tower and the unpatched decoder layers run
alone at the plan's per-layer lengths: no scoring, no bookkeeping), the overhead of the
method over that ideal, analytic FLOPs and their speedup, the measured speedup, and peak
memory above the weights.

    python scripts/bench_prefill.py                     # CPU, float32, sdpa
    python scripts/bench_prefill.py --family llava_next --budgets 1.0,0.5,0.25,0.1
    python scripts/bench_prefill.py --family llava_onevision --layers 28 --budgets 0.5,0.1 [--video 32]
    python scripts/bench_prefill.py --family qwen3_vl --layers 36 --budgets 0.5,0.25,0.1
    python scripts/bench_prefill.py --device cuda --dtype bfloat16 --width 4096 --vision-width 1024
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date

import torch

import vtc
from vtc.eval.cost import interleaved_medians, peak_memory_bytes, timed
from vtc.testing import (
    image_token_count,
    llava15_shaped,
    llava_next_shaped,
    llava_onevision_shaped,
    onevision_inputs,
    onevision_video_tokens,
    qwen2_5_vl_shaped,
    qwen3_vl_shaped,
    qwen_inputs,
    tiled_inputs,
    tiny_inputs,
)

QWEN = {"qwen2_5_vl": "Qwen2.5-VL-7B", "qwen3_vl": "Qwen3-VL-8B"}  # families with 3-D M-RoPE positions
IMAGE = {"llava_next": (672, 672),  # LLaVA-NeXT's largest square image: a base image and 2x2 tiles
         "llava_onevision": (768, 768)}  # LLaVA-OneVision: a base tile and 2x2 tiles (54x54 tokens, no downscaling)


def ideal_prefill(model, inputs, lengths: list[int]):
    """A function running the unpatched model's modules at the given per-layer lengths."""
    base, lm = model.model, model.model.language_model
    cache = {}
    for n in set(lengths):
        h = torch.zeros(1, n, lm.config.hidden_size, device=model.device, dtype=model.dtype)
        pos = torch.arange(n, device=model.device)[None]
        pe = lm.rotary_emb(h, pos[None].expand(3, -1, -1) if QWEN.get(model.config.model_type) else pos)
        mask = None
        if model.config.text_config._attn_implementation == "eager":
            mask = torch.full((n, n), torch.finfo(model.dtype).min, device=model.device, dtype=model.dtype)
            mask = mask.triu(1)[None, None]
        cache[n] = (pe, mask)

    @torch.no_grad()
    def run():
        h = base.get_input_embeddings()(inputs["input_ids"])
        if "pixel_values_videos" in inputs:  # LLaVA-OneVision's video: its frames pooled, a newline
            feats = base.get_video_features(inputs["pixel_values_videos"]).pooler_output.flatten(0, 1)
            token = model.config.video_token_id
        else:
            images = {k: v for k, v in inputs.items()
                      if k in ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw")}
            feats = torch.cat(list(base.get_image_features(**images).pooler_output))
            token = model.config.image_token_id
        h = h.masked_scatter((inputs["input_ids"] == token)[..., None], feats)
        for layer, n in zip(lm.layers, lengths):
            if h.shape[1] != n:
                h = h[:, -n:]
            pe, mask = cache[n]
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        return model.lm_head(lm.norm(h[:, -1:]))

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="default: every method (with --video: dycoke too)")
    p.add_argument("--family", default="llava",
                   choices=["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--video", type=int, default=0, help="llava_onevision: a video of this many frames, no image")
    p.add_argument("--budgets", default="576,288,144,64", help="counts, or fractions with a point (0.25)")
    p.add_argument("--width", type=int, default=256, help="LLM hidden size (LLaVA-1.5-7B: 4096)")
    p.add_argument("--vision-width", type=int, default=256, help="vision hidden size (CLIP-L: 1024)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=32, help="LLM head size (LLaVA-1.5-7B: 128)")
    p.add_argument("--text", type=int, default=64, help="text tokens around the image")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    build = {"llava": llava15_shaped, "llava_next": llava_next_shaped, "llava_onevision": llava_onevision_shaped,
             "qwen2_5_vl": qwen2_5_vl_shaped, "qwen3_vl": qwen3_vl_shaped}
    build = build[args.family]
    model = build(width=args.width, vision_width=args.vision_width, layers=args.layers, attn=args.attn,
                  dtype=getattr(torch, args.dtype), head_dim=args.head_dim).to(args.device)
    if args.family == "llava":
        inputs = tiny_inputs(model, text=args.text)
    elif args.family in QWEN:  # one image of 64x64 patches: 1,024 tokens after the 2x2 merger
        inputs = qwen_inputs(model, images=[[(64, 64)]], text=args.text)
    elif args.family == "llava_onevision":
        images = [[]] if args.video else [[IMAGE[args.family]]]
        inputs = onevision_inputs(model, images=images, videos=[[args.video]] if args.video else None, text=args.text)
        if args.video:
            inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_sizes", "batch_num_images")}
    else:
        inputs = tiled_inputs(model, images=[[IMAGE[args.family]]], text=args.text)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    if args.family in QWEN:
        image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    elif args.video:
        image_tokens = onevision_video_tokens(model, args.video)
    else:
        image_tokens = image_token_count(model, IMAGE.get(args.family))
    text = inputs["input_ids"].shape[1] - image_tokens
    configs = {"unpatched": (None, None)}
    names = args.methods.split(",") if args.methods else vtc.list_methods(standalone=True, images=not args.video)
    for method in names:
        try:
            vtc.plan(model, method)
        except vtc.MethodNotApplicableError as e:
            print(f"skipping {method}: {e}", file=sys.stderr)
            continue
        for b in args.budgets.split(","):
            configs[f"{method}@{b}"] = (method, float(b) if "." in b else int(b))

    def measured(method, budget):
        def run():
            if method is None:
                return timed(lambda: model(**inputs, logits_to_keep=1))
            with vtc.compressed(model, method, budget=budget), torch.no_grad():
                return timed(lambda: model(**inputs, logits_to_keep=1))
        return run

    fns, rows = {}, {}
    for name, (method, budget) in configs.items():
        if method is None:
            lengths = [text + image_tokens] * args.layers
            flops = flops_full = None
        else:
            plan = vtc.plan(model, method, budget=budget)
            lengths = [text + n for n in plan.tokens_per_layer(image_tokens)]  # an image smaller than the plan's
            with vtc.compressed(model, method, budget=budget), torch.no_grad():
                model(**inputs, logits_to_keep=1)
                stats = vtc.stats(model)
            flops, flops_full = stats.flops, stats.flops_full
        ideal = ideal_prefill(model, inputs, lengths)
        fns[name] = torch.no_grad()(measured(method, budget))
        fns[name + " ideal"] = lambda f=ideal: timed(f)
        rows[name] = {"method": method, "budget": budget, "flops": flops, "flops_full": flops_full,
                      "equiv": sum(lengths) / len(lengths) - text}

    def progress(r):
        print(f"\rround {r}/{args.rounds}", end="", file=sys.stderr, flush=True)

    with torch.no_grad():
        times = interleaved_medians({k: (lambda f=f: f()) for k, f in fns.items()}, rounds=args.rounds,
                                    progress=progress, timer=False)
        print(file=sys.stderr)
        memory = {}
        for name, (method, budget) in configs.items():
            if method is None:
                memory[name] = peak_memory_bytes(lambda: model(**inputs, logits_to_keep=1))
            else:
                with vtc.compressed(model, method, budget=budget):
                    memory[name] = peak_memory_bytes(lambda: model(**inputs, logits_to_keep=1))

    base_t = times["unpatched"]
    print(f"# prefill benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}, {args.dtype}, "
          f"{args.attn}")
    shape = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision",
             **QWEN}[args.family]
    print(f"# {shape} shape at width {args.width} (vision {args.vision_width}), {args.layers} layers, head size "
          f"{args.head_dim}, "
          f"{image_tokens} visual + {text} text tokens, medians of {args.rounds} interleaved rounds")
    # The ideal leaves out what every forward of the model pays (mask creation, output objects),
    # so "net" divides out the unpatched model's own gap to its ideal.
    base_gap = times["unpatched"] / times["unpatched ideal"]
    print("| config | equiv. tokens | time ms | ideal ms | over ideal | net overhead | speedup | FLOPs speedup "
          "| peak MB | vs unpatched |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        t, ideal = times[name], times[name + " ideal"]
        fl = f"{row['flops_full'] / row['flops']:.2f}x" if row["flops"] else "1.00x"
        print(f"| {name} | {row['equiv']:.0f} | {t * 1e3:.1f} | {ideal * 1e3:.1f} | {t / ideal - 1:+.1%} | "
              f"{t / ideal / base_gap - 1:+.1%} | "
              f"{base_t / t:.2f}x | {fl} | {memory[name] / 2**20:.1f} | "
              f"{memory[name] / memory['unpatched']:.2f} |")


if __name__ == "__main__":
    main()
