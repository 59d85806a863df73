"""The ``vtc`` command line: list methods and models, print a plan, run the demo.

    vtc methods                      # each method, one line, with its native parameters
    vtc models                       # supported model classes
    vtc plan --method fastv --budget 192 [--model PATH_OR_ID]
    vtc demo                         # plans, token counts and prefill speedups on a random model
    vtc sweep [--methods ...] [--budgets ...] [--tasks ...]   # accuracy vs budget through lmms-eval
"""

from __future__ import annotations

import argparse
import sys

import vtc
from vtc.errors import VtcError
from vtc.registry import methods


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2) that points to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str) -> int | float:
    """A budget on the command line: ``192`` is a count, ``0.25`` a fraction.

    Example:
        >>> _number("192"), _number("0.25")
        (192, 0.25)
    """
    from vtc.eval.sweep import _budget

    return _budget(text)


def _budget_arg(text: str) -> int | float:
    """``_number`` as an argparse type (its message becomes argparse's one-line error)."""
    try:
        return _number(text)
    except VtcError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _value(text: str):
    """A parameter value: a number when it reads as one, else the text."""
    try:
        return _number(text)
    except VtcError:
        return text


def _params(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as numbers or comma-separated int tuples when they look like them.

    Example:
        >>> _params(["layer=3", "layers=8,16", "schedule=s.json"])
        {'layer': 3, 'layers': (8, 16), 'schedule': 's.json'}
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VtcError(f"--param {item!r}: write KEY=VALUE, e.g. --param layer=3")
        if "," in value:
            parts = [_value(v.strip()) for v in value.split(",")]
            out[key] = tuple(parts) if all(isinstance(v, int) for v in parts) else value
        else:
            out[key] = _value(value)
    return out


def _meta_model(name: str):
    """The model's architecture without weights (config only), enough for a plan."""
    import torch

    if name == "llava-onevision-shape":
        from vtc.testing import llava_onevision_shaped

        with torch.device("meta"):
            return llava_onevision_shaped()
    if name == "qwen3-vl-shape":
        from vtc.testing import qwen3_vl_shaped

        with torch.device("meta"):
            return qwen3_vl_shaped()
    if name in ("llava-1.5-shape", "llava-next-shape", "qwen2.5-vl-shape"):
        from vtc.testing import llava15_shaped, llava_next_shaped, qwen2_5_vl_shaped

        shaped = {"llava-1.5-shape": llava15_shaped, "llava-next-shape": llava_next_shaped,
                  "qwen2.5-vl-shape": qwen2_5_vl_shaped}[name]
        with torch.device("meta"):
            return shaped()
    from vtc.eval.sweep import _meta_model as checked

    return checked(name)  # a missing or non-VLM model: a one-line error


def cmd_methods(args) -> None:
    for name, cls in sorted(methods().items()):
        print(f"{name:10s} {cls.summary}")
        print(f"{'':10s}   parameters: {cls.describe_params()}")


def cmd_models(args) -> None:
    for name in vtc.list_models():
        print(name)


def _checked_params(method: str, items: list[str]) -> dict:
    from vtc.eval.sweep import check_param_types

    params = _params(items)
    check_param_types(method, params)
    return params


def cmd_plan(args) -> None:
    params = _checked_params(args.method, args.param)
    model = _meta_model(args.model)
    print(vtc.plan(model, args.method, args.budget, **params))


def cmd_demo(args) -> None:
    import torch

    from vtc.eval.cost import interleaved_medians, timed
    from vtc.testing import llava15_shaped, tiny_inputs

    torch.manual_seed(0)
    print("Building a LLaVA-1.5-shaped model at reduced width (random weights, 576 tokens per image)...")
    model = llava15_shaped(width=args.width, vision_width=args.width)
    inputs = tiny_inputs(model, text=64)
    rows, fns = [], {"unpatched": lambda: timed(lambda: model(**inputs, logits_to_keep=1))}
    for method in vtc.list_methods(standalone=True, images=True):
        try:
            plan = vtc.plan(model, method, args.budget)
        except vtc.MethodNotApplicableError as e:
            print(f"\nskipping {method}: {e}")
            continue
        print(f"\n{plan}")
        with vtc.compressed(model, method, args.budget), torch.no_grad():
            model(**inputs, logits_to_keep=1)
            rows.append((method, vtc.stats(model)))

        def run(method=method):
            with vtc.compressed(model, method, args.budget):
                return timed(lambda: model(**inputs, logits_to_keep=1))

        fns[method] = run
    print(f"\nTiming prefill ({args.rounds} interleaved rounds)...")
    with torch.no_grad():
        times = interleaved_medians(fns, rounds=args.rounds, timer=False)
    print(f"\n{'method':10s} {'entering LLM':>12s} {'equivalent':>10s} {'FLOPs':>8s} {'speedup':>8s}")
    print(f"{'unpatched':10s} {576:12d} {576:10.0f} {'100%':>8s} {'1.00x':>8s}")
    for method, s in rows:
        print(f"{method:10s} {s.tokens_entering_llm:12g} {s.equivalent_tokens:10.1f} {s.flops_ratio:8.0%} "
              f"{times['unpatched'] / times[method]:7.2f}x")


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def cmd_sweep(args) -> None:
    from vtc.eval.sweep import SweepSpec, run

    flags = {
        "model": args.model, "methods": _list(args.methods),
        "budgets": None if args.budgets is None else [_number(b) for b in _list(args.budgets)],
        "tasks": _list(args.tasks), "limit": args.limit, "batch_size": args.batch_size, "device": args.device,
        "dtype": args.dtype, "attn": args.attn, "out": args.out,
        "params": _params(args.param) or None, "include_path": args.include_path or None,
        "warmup": args.warmup, "repeats": args.repeats, "backend": args.backend,
    }
    spec = SweepSpec.from_yaml(args.spec, **flags) if args.spec else SweepSpec(
        **{k: v for k, v in flags.items() if v is not None})
    out = run(spec, verbose=args.verbose)
    print(f"results: {out / 'results.jsonl'}; tables: {out / 'summary.md'}; plots: {out}/accuracy_vs_*.png")


def cmd_show(args) -> None:
    from vtc.eval.show import check_show, show

    params = _checked_params(args.method, args.param)
    image = check_show(args.image, args.out, args.model, args.method, args.budget, params)
    model = processor = None
    if args.model:
        model, processor = vtc.from_pretrained(args.model).eval(), vtc.load_processor(args.model)
    answer = show(image, args.question, args.method, args.budget, model=model, processor=processor,
                  out=args.out, **params)
    print(f"answer: {answer}; kept tokens drawn in {args.out}")


def cmd_search(args) -> None:
    from vtc.eval.search import SearchSpec, run_search

    spec = SearchSpec(args.algorithm, model=args.model, calib=args.calib, limit=args.limit, metric=args.metric,
                      tolerance=args.tolerance, budget=args.budget, trials=args.trials, out=args.out,
                      seed=args.seed, batch_size=args.batch_size, device=args.device)
    path = run_search(spec)
    print(f"schedule: {path}; apply it with vtc.apply(model, 'schedule', schedule='{path}')")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="vtc", description="Training-free visual token compression for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the methods and their native parameters").set_defaults(fn=cmd_methods)
    sub.add_parser("models", help="list the supported model classes").set_defaults(fn=cmd_models)
    p = sub.add_parser("plan", help="print the plan a method compiles to on a model (no weights loaded)")
    p.add_argument("--model", default="llava-1.5-shape",
                   help="hub id or path (config only), or llava-1.5-shape / llava-next-shape / qwen2.5-vl-shape /"
                        " qwen3-vl-shape / llava-onevision-shape")
    p.add_argument("--method", required=True)
    p.add_argument("--budget", type=_budget_arg, default=None, help="tokens per image (int) or fraction (float)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a native parameter")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("demo", help="plans, token counts and prefill speedups on a random LLaVA-1.5-shaped model")
    p.add_argument("--budget", type=_budget_arg, default=192)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("sweep", help="evaluate methods x budgets x lmms-eval tasks; tables and plots",
                       description="With no arguments: every method at 192/128/64 of 576 (as fractions) on the "
                       "bundled toy model and toy_vqa, offline. Finished cells are skipped on rerun; a rerun "
                       "into the same --out must use the same settings (OUT/settings.json).")
    p.add_argument("--model", help="hub id or path, or 'toy' (default)")
    p.add_argument("--methods", help="comma-separated, e.g. fastv,vtc_cls (default: all)")
    p.add_argument("--budgets", help="comma-separated counts or fractions, e.g. 192,128,64 or 0.25")
    p.add_argument("--tasks", help="comma-separated lmms-eval tasks (default: toy_vqa)")
    p.add_argument("--limit", type=int, help="questions per task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", help="float32, bfloat16, float16")
    p.add_argument("--attn", help="attention implementation: sdpa, eager, flash_attention_2")
    p.add_argument("--out", help="output folder (default runs/sweep)")
    p.add_argument("--param", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="a native parameter, for every method that has it or for one method")
    p.add_argument("--include-path", action="append", default=[], help="extra lmms-eval task folder")
    p.add_argument("--spec", help="a YAML file with the same keys (flags given here override it)")
    p.add_argument("--warmup", type=int, help="untimed generate calls before timing each cell (default 1)")
    p.add_argument("--repeats", type=int, help="timed generate calls per cell: median and min-max (default 5)")
    p.add_argument("--backend", choices=("hf", "vllm"),
                   help="hf (default): transformers with vtc.apply; vllm: each cell through a vLLM server on "
                        "127.0.0.1 (scripts/setup_serve.sh), --batch-size requests at once (pre-LLM methods)")
    p.add_argument("--verbose", action="store_true", help="show lmms-eval's own progress bars and messages")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("show", help="draw the visual tokens a method keeps at each stage")
    p.add_argument("--image", help="image file (default: a toy scene)")
    p.add_argument("--question", help="question (default: the toy scene's)")
    p.add_argument("--method", default="vtc_cls")
    p.add_argument("--budget", type=_budget_arg, default=None)
    p.add_argument("--model", help="hub id or path (default: the toy model)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="kept.png")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("search", help="search per-layer budgets (G-Search, P-Sigmoid) into a schedule file")
    p.add_argument("algorithm", choices=["gsearch", "psigmoid"])
    p.add_argument("--model", default="toy")
    p.add_argument("--calib", default="toy_vqa", help="calibration set (toy_vqa)")
    p.add_argument("--limit", type=int, default=64, help="calibration questions")
    p.add_argument("--metric", default="kl", choices=["kl", "accuracy"])
    p.add_argument("--tolerance", type=float, default=0.01, help="G-Search: allowed metric loss")
    p.add_argument("--budget", type=_budget_arg, help="P-Sigmoid: equivalent tokens per image")
    p.add_argument("--trials", type=int, default=20, help="P-Sigmoid: Bayesian-optimization trials")
    p.add_argument("--out", default="schedule.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_search)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except vtc.VtcError as e:
        print(f"vtc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
