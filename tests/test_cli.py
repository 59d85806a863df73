from __future__ import annotations

import pytest

from vtc.cli import main


def test_methods_lists_every_method_with_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, param in [("fastv", "layer=2"), ("vtc_cls", "layers=None"), ("random", "seed=0")]:
        assert name in out and param in out


def test_plan_prints_the_table(capsys):
    assert main(["plan", "--method", "fastv", "--budget", "128", "--param", "layer=3"]) == 0
    out = capsys.readouterr().out
    assert "layer:3" in out and "query_attention@L2" in out and "equivalent: 12" in out


def test_plan_on_the_llava_next_shape(capsys):
    assert main(["plan", "--model", "llava-next-shape", "--method", "hired"]) == 0
    out = capsys.readouterr().out
    assert "2928 visual tokens per image" in out and "hired(cls_attention@vision[0], alpha=0.5, vote=1, bands=0)" in out
    assert main(["plan", "--method", "hired"]) == 2  # LLaVA-1.5 has no tiles
    assert "llava_next only" in capsys.readouterr().err


def test_bad_budget_exits_2_with_a_message(capsys):
    assert main(["plan", "--method", "vtc_cls", "--budget", "0"]) == 2
    assert "keeps no visual token" in capsys.readouterr().err


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        main(["nope"])


def test_demo_runs_every_method_that_applies(capsys):
    assert main(["demo", "--width", "32", "--rounds", "1", "--budget", "128"]) == 0
    out = capsys.readouterr().out
    assert "skipping hired" in out  # LLaVA-1.5 has no tiles
    assert all(f"\n{m} " in out for m in ("aim", "fastv", "vtc_cls", "tome"))


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return e.code


@pytest.fixture
def no_model_loads(monkeypatch, tmp_path):
    import vtc

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(vtc, "from_pretrained", no_loading)
    monkeypatch.setenv("VTC_CACHE", str(tmp_path / "cache"))


def _non_vlm(tmp_path) -> str:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


def _bad_yaml(tmp_path) -> str:
    (tmp_path / "bad.yaml").write_text("methods: [vtc_cls\nbudgets: 16\n")
    return str(tmp_path / "bad.yaml")


def _typo_yaml(tmp_path) -> str:
    (tmp_path / "typo.yaml").write_text("methods: vtc_cls\nlimit: ten\n")
    return str(tmp_path / "typo.yaml")


CLI_ERRORS = [
    (["sweep", "--budgets", "abc"], "budget 'abc' is not a number"),
    (["sweep", "--budgets", "0.5,x"], "budget 'x' is not a number"),
    (["sweep", "--model", "/no/such/model"], "cannot load a model config from '/no/such/model'"),
    (["sweep", "--model", _non_vlm], "is a 'llama' model, not a vision-language model"),
    (["sweep", "--spec", _bad_yaml], "is not valid YAML at line"),
    (["sweep", "--spec", _typo_yaml], "limit must be an integer >= 1, got 'ten'"),
    (["sweep", "--spec", "/no/such.yaml"], "cannot read the spec"),
    (["sweep", "--dtype", "float33"], "dtype 'float33' is not one of float32"),
    (["sweep", "--attn", "flash"], "unknown attention implementation 'flash'"),
    (["sweep", "--methods", "pdrop", "--param", "ratio=abc"], "pdrop ratio='abc': expects a number"),
    (["sweep", "--param", "ratio"], "write KEY=VALUE"),
    (["sweep", "--limit", "0"], "limit must be an integer >= 1"),
    (["sweep", "--limit", "x"], "invalid int value"),
    (["sweep", "--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["sweep", "--device", "tpu9"], "unknown device 'tpu9'"),
    (["sweep", "--out", "/proc/vtc-sweep"], "cannot write to /proc/vtc-sweep"),
    (["plan", "--method", "pdrop", "--param", "ratio=abc"], "pdrop ratio='abc': expects a number"),
    (["plan", "--method", "fastv", "--budget", "abc"], "budget 'abc' is not a number"),
    (["plan", "--method", "fastv", "--model", "/no/such/model"], "cannot load a model config"),
    (["show", "--image", "/no/such.jpg"], "--image /no/such.jpg: no such file"),
    (["show", "--image", __file__], "is not an image PIL can read"),
    (["show", "--out", "/proc/vtc/kept.png"], "cannot write to /proc/vtc"),
    (["show", "--model", "/no/such/model"], "cannot load a model config"),
    (["show", "--method", "vtc_cls", "--budget", "500"], "above the model's 144"),
    (["search", "psigmoid", "--budget", "16"], "layer 0 keeps all 144 tokens"),
    (["search", "gsearch", "--tolerance", "-1"], "--tolerance -1.0: use a finite number >= 0"),
    (["search", "gsearch", "--tolerance", "nan"], "--tolerance nan"),
    (["search", "psigmoid", "--budget", "48", "--trials", "0"], "--trials 0: use an integer >= 1"),
    (["search", "gsearch", "--limit", "0"], "--limit 0: use an integer >= 1"),
    (["search", "gsearch", "--model", "/no/such/model"], "cannot load a model config"),
]


def _case_id(value) -> str:
    return " ".join(getattr(a, "__name__", a) for a in value) if isinstance(value, list) else ""


@pytest.mark.parametrize(("argv", "message"), CLI_ERRORS, ids=_case_id)
def test_user_errors_are_one_line_exit_2_before_any_model_loads(argv, message, capsys, tmp_path, no_model_loads):
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    if argv[0] in ("sweep", "search") and "--out" not in argv:
        argv += ["--out", str(tmp_path / ("out" if argv[0] == "sweep" else "out.json"))]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vtc"), err
    assert message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path, no_model_loads):
    assert _exit_code(["sweep", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is available here: pass --device cpu" in err
