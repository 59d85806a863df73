"""Why the in-LLM methods rank as they do on the LLaVA toy (docs/results.md section 1, "Readings"): each method
and counterfactual variants of it, one question at a time, with the share of the asked object's patches kept at
every stage and the questions whose asked object lost every patch.

* ``sparsevlm``: its default raters (text tokens whose input-embedding attention from the image is above the
  mean) against other rater sets, swapped in for :func:`vtc.ops.select_raters`: the question's color and shape
  words, every text token, the answer position alone.
* ``dart``: the official 4 + 4 pivots against fewer image pivots.
* ``why``: which words SparseVLM's rule makes raters, and where DART's image pivots and its other picks fall
  (background or object patches).
* ``matched``: FastV and DART keeping after layer 2 the share LLaVA-1.5-7B keeps at budgets 192 / 128 / 64
  (166 / 98 / 30 of 576 -> 42 / 24 / 8 of 144): the toy's 8 layers make a budget harsher on in-LLM methods
  than 32 layers do.

    python scripts/toy_in_llm.py --n 500 --only sparsevlm,dart,why,matched
    python scripts/toy_in_llm.py --n 500 --only dart,why --family qwen2_5_vl
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import vtc
from vtc import ops
from vtc.eval import toy

OFFICIAL_RATERS = ops.select_raters


def run(model, processor, records, method: str, budget, params: dict, raters=None) -> dict:
    """Accuracy, asked-object (and all-object) patches kept per stage, and the share of questions whose asked
    object lost every patch, with ``raters`` in place of :func:`vtc.ops.select_raters` when given."""
    if raters is not None:
        ops.select_raters = raters
    acc, asked_kept, objects_kept, lost = [], [], [], []
    try:
        with vtc.compressed(model, method, budget=budget, **params):
            for record in records:
                prediction = toy.answer(model, processor, [record])[0]
                acc.append(toy.score([record], [prediction])["overall"])
                asked = torch.as_tensor(toy.asked_tokens(record))
                objects = torch.as_tensor(toy.patch_labels(record.scene)[1]) > 0
                kept = {stage: rows[0].cpu() for stage, rows in vtc.stats(model).kept.items()}
                objects_kept.append([float(objects[k].sum() / objects.sum()) for k in kept.values()])
                if asked.any():  # a "no" to a presence question may name no object of the scene
                    asked_kept.append([float(asked[k].sum() / asked.sum()) for k in kept.values()])
                    lost.append(float(asked[list(kept.values())[-1]].sum() == 0))
    finally:
        ops.select_raters = OFFICIAL_RATERS
    return {"accuracy": float(np.mean(acc)), "stages": list(kept), "asked": np.mean(asked_kept, 0),
            "objects": np.mean(objects_kept, 0), "lost": float(np.mean(lost))}


def rater_sets(model, processor) -> dict:
    """Rater rules to compare with SparseVLM's: functions ``(visual, text) -> bool [T]`` over the text rows."""
    table = model.get_input_embeddings().weight.detach()
    tok = processor.tokenizer
    words = table[[tok.convert_tokens_to_ids(w) for w in (*toy.COLOR_NAMES, *toy.SHAPES)]]

    def named(visual, text):  # the question's color and shape words (rows equal to their embeddings)
        hit = (torch.cdist(text.float(), words.float()) < 1e-4).any(-1)
        return hit if hit.any() else OFFICIAL_RATERS(visual, text)

    def last(visual, text):
        mask = torch.zeros(text.shape[0], dtype=torch.bool)
        mask[-1] = True
        return mask

    return {"color/shape words": named, "all text": lambda visual, text: torch.ones(text.shape[0], dtype=torch.bool),
            "answer position": last}


def why(model, processor, records, budget) -> None:
    """Print the words chosen as SparseVLM's raters (questions in which each is one), and the share of DART's
    image pivots and of its other picks that are object patches, recorded by wrapping the two operators."""
    table = model.get_input_embeddings().weight.detach()
    words, picks = [], []

    def raters(visual, text):
        chosen = OFFICIAL_RATERS(visual, text)
        ids = torch.cdist(text[chosen].float(), table.float()).argmin(-1)
        words.append(set(processor.tokenizer.convert_ids_to_tokens(ids.tolist())))
        return chosen

    official_dart = ops.dart_select

    def dart(keys, hidden, image, text, keep, pivot_image=4, pivot_text=4, positions=None):
        kept = official_dart(keys, hidden, image, text, keep, pivot_image, pivot_text, positions)
        pivots = image[keys[image].abs().sum(-1).topk(pivot_image).indices]
        picks.append((pivots, kept, image))
        return kept

    run(model, processor, records, "sparsevlm", budget, {}, raters)
    counts: dict[str, int] = {}
    for chosen in words[: len(records)]:  # the first stage's raters of each question
        for w in chosen:
            counts[w] = counts.get(w, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    print(f"sparsevlm raters (questions of {len(records)}): " + ", ".join(f"{w} {c}" for w, c in top))
    ops.dart_select = dart
    try:
        run(model, processor, records, "dart", budget, {})
    finally:
        ops.dart_select = official_dart
    on_pivots = on_picks = n_pivots = n_picks = 0
    for record, (pivots, kept, image) in zip(records, picks, strict=True):
        objects = torch.as_tensor(toy.patch_labels(record.scene)[1]) > 0
        patch = {int(r): j for j, r in enumerate(image.tolist())}
        pivot_set = {int(r) for r in pivots}
        on_pivots += sum(bool(objects[patch[r]]) for r in pivot_set)
        others = [int(r) for r in kept if int(r) not in pivot_set]
        on_picks += sum(bool(objects[patch[r]]) for r in others)
        n_pivots, n_picks = n_pivots + len(pivot_set), n_picks + len(others)
    print(f"dart image pivots on object patches {on_pivots}/{n_pivots}; other picks on object patches "
          f"{on_picks}/{n_picks}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60, help="held-out questions (seed toy.EVAL_SEED)")
    p.add_argument("--budget", type=float, default=48, help="tokens per image (int) or a fraction")
    p.add_argument("--only", default="sparsevlm,dart,matched")
    p.add_argument("--family", default="llava", choices=sorted(toy.MODEL_PATHS), help="which toy")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, processor = toy.load(family=args.family)
    records = toy.generate(args.n, seed=toy.EVAL_SEED)
    budget = int(args.budget) if args.budget > 1 else args.budget
    variants = {
        "sparsevlm": [("sparsevlm", "official raters", budget, {}, None)]
        + [("sparsevlm", f"raters: {name}", budget, {}, rule) for name, rule in rater_sets(model, processor).items()],
        "dart": [("dart", "4 + 4 pivots (official)", budget, {}, None),
                 ("dart", "1 + 4 pivots", budget, {"pivot_image": 1, "pivot_text": 4}, None),
                 ("fastv", "", budget, {}, None)],
        "matched": [(m, f"keep {k} after layer 2", None, {"keep": k}, None) for k in (42, 24, 8)
                    for m in ("fastv", "dart")],
    }
    print(f"{len(records)} questions; budget {budget} unless a keep is given")
    for group in args.only.split(","):
        if group == "why":
            why(model, processor, records, budget)
            continue
        for method, label, b, params, raters in variants[group]:
            r = run(model, processor, records, method, b, params, raters)
            stages = " ".join(f"{s} {a:.2f}/{o:.2f}" for s, a, o in zip(r["stages"], r["asked"], r["objects"]))
            print(f"{method:10s}{label:26s} accuracy {r['accuracy']:.3f}  asked object lost {r['lost']:.3f}  "
                  f"asked/all object patches kept: {stages}", flush=True)


if __name__ == "__main__":
    main()
