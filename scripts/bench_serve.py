#!/usr/bin/env python
"""Serving benchmark: requests per second and time to first token of `vllm serve` on the toy,
uncompressed and with each pre-LLM method at 1/3 and 1/9 of the 144 visual tokens, under many
concurrent requests (openai client, streamed chat completions with one image each).

Run in the serve venv (scripts/setup_serve.sh); each cell starts its own server on 127.0.0.1:

    .venv-serve/bin/python scripts/bench_serve.py --n 256 --concurrency 32 --out runs/bench_serve

Writes OUT/bench.json and OUT/bench.md (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from vtc.eval import toy
from vtc.eval.serve import client_answers, server

CELLS = [("none", None)] + [(m, b) for m in ("vtc_cls", "visionzip", "random", "pool", "merge", "divprune")
                            for b in ("1/3", "1/9")]


WIDE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_dim": 64}


def wide_model(folder: Path) -> Path:
    """The toy with a wider, deeper LLM (random weights, ~150M parameters): the same tower, processor and
    prompts, but an LLM whose prefill outweighs the server's per-request work, as a real VLM's does."""
    if (folder / "model.safetensors").exists():
        return folder
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, LlavaForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    for f in toy.MODEL_PATH.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, folder / f.name)
    config = AutoConfig.from_pretrained(toy.MODEL_PATH)
    for k, v in WIDE.items():
        setattr(config.text_config, k, v)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    config.save_pretrained(folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)  # the hub's layout, as the toy's (vLLM's loader reads it)
    flat, hub = "vision_tower.", "vision_tower.vision_model."
    save_file({(hub + k[len(flat):] if k.startswith(flat) and not k.startswith(hub) else k): v
               for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="timed requests per cell")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=16, help="untimed requests per cell first")
    parser.add_argument("--methods", help="comma-separated subset of the methods (none = uncompressed)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_serve"))
    parser.add_argument("--wide", action="store_true",
                        help="the toy's tower with a wider random LLM (1024 wide, 12 layers): prefill-bound")
    args = parser.parse_args()
    model = wide_model(args.out / "wide-model") if args.wide else toy.MODEL_PATH
    args.out.mkdir(parents=True, exist_ok=True)
    cells = [c for c in CELLS if not args.methods or c[0] in args.methods.split(",")]
    records = toy.generate(args.n, seed=toy.EVAL_SEED)
    rows = []
    for method, budget in cells:
        with server(model, None if method == "none" else method, budget,
                    log=args.out / f"server-{method}-{str(budget).replace('/', '_')}.log") as url:
            client_answers(url, records[: args.warmup], args.concurrency)
            answers, ttft, wall = client_answers(url, records, args.concurrency)
        ttft.sort()
        row = {"method": method, "budget": budget, "n": len(records), "concurrency": args.concurrency,
               "requests_per_s": len(records) / wall, "ttft_median_s": statistics.median(ttft),
               "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))], "accuracy": toy.score(records, answers)["overall"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0] if rows and rows[0]["method"] == "none" else None
    meta = {"machine": f"{os.cpu_count()} CPU cores, {platform.machine()}", "load": os.getloadavg(),
            "model": "wide" if args.wide else "toy",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (args.out / "bench.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    lines = ["| method | budget | requests/s | speedup | TTFT median (s) | TTFT p90 (s) | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['requests_per_s'] / base['requests_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r['method']} | {r['budget'] or 'all 144'} | {r['requests_per_s']:.1f} | {speed} | "
                     f"{r['ttft_median_s']:.3f} | {r['ttft_p90_s']:.3f} | {r['accuracy']:.3f} |")
    (args.out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
