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
