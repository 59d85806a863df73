"""Prefill benchmark: a method's wall-clock time against the *ideal* time for the same
per-layer token counts, on a LLaVA-1.5-shaped (576 visual tokens) or LLaVA-NeXT-shaped
(one 672x672 image: 2,928 tokens) model of reduced width (random weights).

For the unpatched model and each method at each budget it prints: prefill time (median of
interleaved rounds), the ideal time (the vision tower and the unpatched decoder layers run
alone at the plan's per-layer lengths: no scoring, no bookkeeping), the overhead of the
method over that ideal, analytic FLOPs and their speedup, the measured speedup, and peak
memory above the weights.

    python scripts/bench_prefill.py                     # CPU, float32, sdpa
    python scripts/bench_prefill.py --family llava_next --budgets 1.0,0.5,0.25,0.1
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
from vtc.testing import image_token_count, llava15_shaped, llava_next_shaped, tiled_inputs, tiny_inputs

IMAGE = {"llava_next": (672, 672)}  # LLaVA-NeXT's largest square image: a base image and 2x2 tiles


def ideal_prefill(model, inputs, lengths: list[int]):
    """A function running the unpatched model's modules at the given per-layer lengths."""
    base, lm = model.model, model.model.language_model
    cache = {}
    for n in set(lengths):
        h = torch.zeros(1, n, lm.config.hidden_size, device=model.device, dtype=model.dtype)
        pe = lm.rotary_emb(h, torch.arange(n, device=model.device)[None])
        mask = None
        if model.config.text_config._attn_implementation == "eager":
            mask = torch.full((n, n), torch.finfo(model.dtype).min, device=model.device, dtype=model.dtype)
            mask = mask.triu(1)[None, None]
        cache[n] = (pe, mask)

    @torch.no_grad()
    def run():
        images = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
        feats = torch.cat(list(base.get_image_features(**images).pooler_output))
        h = base.get_input_embeddings()(inputs["input_ids"])
        h = h.masked_scatter((inputs["input_ids"] == model.config.image_token_id)[..., None], feats)
        for layer, n in zip(lm.layers, lengths):
            if h.shape[1] != n:
                h = h[:, -n:]
            pe, mask = cache[n]
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        return model.lm_head(lm.norm(h[:, -1:]))

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(vtc.list_methods(standalone=True)))
    p.add_argument("--family", default="llava", choices=["llava", "llava_next"])
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

    build = llava15_shaped if args.family == "llava" else llava_next_shaped
    model = build(width=args.width, vision_width=args.vision_width, layers=args.layers, attn=args.attn,
                  dtype=getattr(torch, args.dtype), head_dim=args.head_dim).to(args.device)
    if args.family == "llava":
        inputs = tiny_inputs(model, text=args.text)
    else:
        inputs = tiled_inputs(model, images=[[IMAGE[args.family]]], text=args.text)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    image_tokens = image_token_count(model, IMAGE.get(args.family))
    text = inputs["input_ids"].shape[1] - image_tokens
    configs = {"unpatched": (None, None)}
    for method in args.methods.split(","):
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
            lengths = [text + n for n in plan.tokens_per_layer()]
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
    shape = "LLaVA-1.5" if args.family == "llava" else "LLaVA-NeXT"
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
