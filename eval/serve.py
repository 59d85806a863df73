"""Running vtc's methods in vLLM on the toy benchmark: the serve venv, the server, its clients.

The main venv (transformers >= 5.24) and the serve venv (``scripts/setup_serve.sh``: vLLM, whose
transformers is older) stay apart: code here that imports vLLM or the openai client runs in the
serve venv, started from the main venv as a subprocess (``python -m vtc.eval.serve ...``).

Commands (serve venv):

* ``features --methods vtc_cls:1/3,... --out F.pt``: per method, the placeholders vLLM puts in
  a toy prompt and the features its model returns for toy images (offline engine);
* ``answer --method M --budget B --n N --out F.json``: toy answers from the offline engine;
* ``client --url U --n N --out F.json``: toy answers from a running server (openai client);
* ``bench --url U --n N --concurrency C``: requests/s and time to first token of a server.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Engine settings for the toy on CPU (design notes, section 7): the share of RAM the KV cache may take.
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "gpu_memory_utilization": 0.15}


def serve_python() -> Path | None:
    """The serve venv's python (``VTC_SERVE_VENV`` or ``.venv-serve`` beside the repo), if installed.

    Example:
        >>> serve_python() is None or serve_python().name == "python"
        True
    """
    venv = Path(os.environ.get("VTC_SERVE_VENV", ROOT / ".venv-serve"))
    python = venv / "bin" / "python"
    return python if python.exists() else None


def budget_text(budget) -> str:
    """A budget as the plugin parses it (``1/3`` stays a fraction).

    Example:
        >>> budget_text(1 / 3), budget_text(48), budget_text("1/9")
        ('0.3333333333333333', '48', '1/9')
    """
    return str(budget)


def serve_argv(model: str | Path, method: str | None, budget=None, port: int = 8000, params: dict | None = None,
               venv_python: Path | None = None) -> list[str]:
    """The ``vllm serve`` command line for ``model`` with a vtc method, on loopback.

    Example:
        >>> argv = serve_argv("eval/toy/model", "vtc_cls", "1/3", venv_python=Path("/v/bin/python"))
        >>> argv[:3], argv[argv.index("--hf-overrides") + 1]
        (['/v/bin/vllm', 'serve', 'eval/toy/model'], '{"vtc_method": "vtc_cls", "vtc_budget": "1/3"}')
    """
    python = venv_python or serve_python() or Path(sys.executable)
    overrides = {} if not method else {"vtc_method": method, "vtc_budget": budget_text(budget)}
    if method and params:
        overrides["vtc_params"] = params
    argv = [str(python.parent / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", ENGINE["dtype"], "--enforce-eager", "--max-model-len", str(ENGINE["max_model_len"]),
            "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]), "--served-model-name", "toy"]
    if overrides:
        argv += ["--hf-overrides", json.dumps(overrides)]
    return argv


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: str | Path, method: str | None, budget=None, port: int | None = None, timeout: float = 600,
           log: Path | None = None, params: dict | None = None) -> Iterator[str]:
    """Start ``vllm serve`` on 127.0.0.1 (serve venv), wait until it answers ``/health``, yield its
    base URL (``http://127.0.0.1:PORT/v1``), and stop it."""
    port = port or free_port()
    python = serve_python()
    if python is None:
        raise RuntimeError("the serve venv is missing: run `bash scripts/setup_serve.sh`")
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(serve_argv(model, method, budget, port, params, python), stdout=out,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}" + (f"; see {log}" if log else ""))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve did not start within {timeout:.0f}s")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def image_url(image) -> str:
    """A PIL image as a PNG data URL (what the OpenAI API takes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(record) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(record.image)}},
                                         {"type": "text", "text": record.question}]}]


def first_word(text: str) -> str:
    """The answer word of a reply, as the toy harness scores it."""
    from vtc.eval.toy.harness import _first_word

    return _first_word(text)


def client_answers(url: str, records: Sequence, concurrency: int = 16) -> tuple[list[str], list[float], float]:
    """Ask a running server each toy question (chat completions, greedy, 3 tokens, streamed),
    ``concurrency`` at a time. Returns the answers, each request's time to first token, and the wall time."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def ask(record) -> tuple[str, float]:
        t0 = time.perf_counter()
        ttft, text = None, ""
        stream = client.chat.completions.create(model="toy", messages=_messages(record), max_tokens=3,
                                                temperature=0.0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += chunk.choices[0].delta.content
        return first_word(text), ttft if ttft is not None else time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, records))
    return [a for a, _ in results], [t for _, t in results], time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def toy_processor():
    """The toy's processor (its chat template writes the prompts vLLM receives offline)."""
    from transformers import AutoProcessor

    from vtc.eval import toy

    return AutoProcessor.from_pretrained(toy.MODEL_PATH)


def offline_llm(method: str | None, budget=None, params: dict | None = None, model: str | Path | None = None):
    """vLLM's offline engine on the toy with a vtc method (in this process: multiprocessing off)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from vtc.eval import toy

    overrides = {} if not method else {"vtc_method": method, "vtc_budget": budget_text(budget),
                                       "vtc_params": params or {}}
    return LLM(model=str(model or toy.MODEL_PATH), hf_overrides=overrides, seed=0, **ENGINE)


def offline_prompts(records: Sequence) -> list[dict]:
    """vLLM's offline inputs for toy records: the chat prompt and the image."""
    from vtc.eval import toy

    return [{"prompt": toy.prompt(toy_processor(), r.question), "multi_modal_data": {"image": r.image}}
            for r in records]


def offline_answers(llm, records: Sequence) -> list[str]:
    """Greedy toy answers from an offline engine."""
    from vllm import SamplingParams


    prompts = offline_prompts(records)
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    return [first_word(o.outputs[0].text) for o in outs]


def _features(llm, records: Sequence) -> dict:
    """Placeholders per image in vLLM's processed prompt, and the features its model returns."""
    from vllm import SamplingParams


    processor = toy_processor()
    image_token = llm.llm_engine.model_config.hf_config.image_token_index
    prompts = offline_prompts(records)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    counts = [sum(t == image_token for t in o.prompt_token_ids) for o in outs]
    pixels = processor.image_processor([r.image for r in records], return_tensors="pt")["pixel_values"]

    def embed(model):
        import torch

        with torch.no_grad():
            return [e.detach().cpu().clone() for e in model.embed_multimodal(pixel_values=pixels.to(torch.float32))]

    (feats,) = llm.apply_model(embed)
    return {"counts": counts, "features": feats}


def _parse_methods(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split(":", 1)) if ":" in item else (item, "") for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.serve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features")
    f.add_argument("--methods", required=True, help="method:budget,... (none for uncompressed)")
    f.add_argument("--n", type=int, default=4)
    f.add_argument("--seed", type=int, default=5)
    f.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("answer")
    a.add_argument("--method", default=None)
    a.add_argument("--budget", default=None)
    a.add_argument("--n", type=int, default=64)
    a.add_argument("--seed", type=int, default=7)
    a.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("client")
    c.add_argument("--url", required=True)
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from vtc.eval import toy

    if args.command == "features":
        import torch

        records = toy.generate(args.n, seed=args.seed)
        result = {}
        for method, budget in _parse_methods(args.methods):
            llm = offline_llm(None if method == "none" else method, budget or None)
            result[f"{method}:{budget}"] = _features(llm, records)
            del llm
        torch.save(result, args.out)
    elif args.command == "answer":
        records = toy.generate(args.n, seed=args.seed)
        t0 = time.perf_counter()
        answers = offline_answers(offline_llm(args.method, args.budget), records)
        args.out.write_text(json.dumps({"answers": answers, "seconds": time.perf_counter() - t0}))
    elif args.command == "client":
        records = toy.generate(args.n, seed=args.seed)
        answers, ttft, wall = client_answers(args.url, records, args.concurrency)
        args.out.write_text(json.dumps({"answers": answers, "ttft": ttft, "seconds": wall}))


if __name__ == "__main__":
    main()
