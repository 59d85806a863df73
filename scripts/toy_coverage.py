"""How much of the objects each method keeps on the toy model: per question, the share of the image's
object patches among the tokens that reach the LLM's last layer, beside the accuracy (one question at a
time, so every record's own kept tokens are read), and the accuracy on the questions whose asked
object kept a token / lost every token (``toy.answers_without_the_object``).

    python scripts/toy_coverage.py --methods dart,fastv,sparsevlm,random --budget 48 --n 60
    python scripts/toy_coverage.py --family qwen2_5_vl --methods random --budget 0.111 --n 300
"""

from __future__ import annotations

import argparse

import torch
from toy_in_llm import run  # scripts/toy_in_llm.py, beside this file

import vtc
from vtc.eval import toy


def coverage(model, processor, method: str, budget: float, records: list) -> tuple[float, float]:
    """Mean accuracy and mean share of object patches kept at the last stage, over ``records``."""
    result = run(model, processor, records, method, budget, {})
    return result["accuracy"], float(result["objects"][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="dart,fastv,sparsevlm,random")
    p.add_argument("--budget", type=float, default=48, help="tokens per image (int) or a fraction")
    p.add_argument("--n", type=int, default=60, help="held-out questions (seed toy.EVAL_SEED)")
    p.add_argument("--family", default="llava", choices=sorted(toy.MODEL_PATHS), help="which toy")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, processor = toy.load(family=args.family)
    records = toy.generate(args.n, seed=toy.EVAL_SEED)
    budget = int(args.budget) if args.budget.is_integer() and args.budget > 1 else args.budget
    print(f"{'method':<12} accuracy  object patches kept (last stage)  asked object kept | lost (n)")
    for method in args.methods.split(","):
        acc, share = coverage(model, processor, method, budget, records)
        with vtc.compressed(model, method, budget=budget):
            g = toy.answers_without_the_object(model, processor, records)
        split = f"{g['kept']['overall']:.3f} ({g['kept']['n']}) | {g['dropped']['overall']:.3f} ({g['dropped']['n']})"
        print(f"{method:<12} {acc:8.3f}  {share:6.1%}{'':28}{split}")


if __name__ == "__main__":
    main()
