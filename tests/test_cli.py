"""The ``wideep`` console script (run in-process on the emulated CPU devices)."""
from __future__ import annotations

import re

import pytest

from wideep_jax.bench import imbalance, parse_skew
from wideep_jax.cli import main

SMALL = ["bench-moe", "--hidden", "32", "--intermediate", "16", "--experts", "16", "--top-k", "4",
         "--n-group", "4", "--topk-group", "2", "--tokens", "16", "--iters", "1"]


def _ints(line: str) -> list[int]:
    return [int(v) for v in re.search(r"\[([\d, ]+)\]", line).group(1).split(",")]


@pytest.mark.parametrize("extra,ep", [([], 8), (["--ep", "4", "--skew", "zipf:1.5"], 4),
                                      (["--ep", "2", "--skew", "router", "--backend", "CUTLASS"], 2),
                                      (["--ep", "4", "--skew", "router", "--router", "llama4"], 4)])
def test_bench_moe_reports_load(capsys, extra, ep):
    assert main(SMALL + extra) == 0
    out = capsys.readouterr().out
    assert re.search(r"-> [\d,]+ tokens/s", out)
    received = _ints(next(line for line in out.splitlines() if "per-rank" in line and "tokens" in line))
    rows = _ints(next(line for line in out.splitlines() if "expert rows" in line))
    assert len(received) == ep and len(rows) == ep
    assert sum(rows) == 16 * ep * 4  # every (token, k) pair computed exactly once
    if "CUTLASS" in extra:
        assert received == [16] * ep
    else:
        assert sum(received) >= 16 * ep  # each token reaches at least one rank


def test_bench_moe_with_config_file(capsys, tmp_path):
    cfg = tmp_path / "moe.yaml"
    cfg.write_text("moe_config:\n  backend: WIDEEP\n  max_num_tokens: 5\n  load_balancer:\n    num_slots: 24\n")
    assert main(SMALL + ["--ep", "4", "--config", str(cfg)]) == 0
    assert "(24 slots)" in capsys.readouterr().out


def test_bench_moe_errors_name_the_value(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe_config:\n  backend: NOPE\n")
    assert main(SMALL + ["--config", str(bad)]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert main(SMALL + ["--skew", "zipf:-1"]) == 2
    assert "zipf:-1" in capsys.readouterr().err
    assert main(SMALL + ["--ep", "9"]) == 2
    assert "--ep=9: allowed: 1..8" in capsys.readouterr().err


@pytest.mark.parametrize("command,flag,value,rule", [
    ("bench-moe", "--ep", "0", ">= 1"),  # 0 is not "every device"
    ("bench-moe", "--ep", "-1", ">= 1"),
    ("bench-moe", "--tokens", "0", ">= 1"),
    ("bench-moe", "--iters", "0", ">= 1"),
    ("bench-moe", "--shared-experts", "-1", ">= 0"),
    ("bench-moe", "--hidden", "x", ">= 1"),
    ("run", "--cpu-devices", "0", ">= 1"),
    ("run", "--batch", "0", ">= 1"),
    ("run", "--seed", "-1", ">= 0"),
    ("eplb", "--num-nodes", "0", ">= 1"),
])
def test_integer_flags_name_flag_value_and_rule(capsys, command, flag, value, rule):
    """Out-of-range ints stop at argument parsing with one line naming the flag, the value
    and the rule (before: a traceback, 'no median for empty data', or a CPU backend error)."""
    args = {"bench-moe": ["bench-moe"], "run": ["run"], "eplb": ["eplb", "generate", "--stats", "s"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main(args + [flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: '{value}': allowed: an int {rule}" in capsys.readouterr().err


def test_parse_skew_and_imbalance():
    assert parse_skew("uniform") == 0.0 and parse_skew("zipf:1.2") == 1.2 and parse_skew("router") is None
    for bad in ("zipf:x", "zipf:inf", "zipf:nan", "zipf:0"):
        with pytest.raises(ValueError, match=f"--skew='{bad}'.*a finite S > 0"):
            parse_skew(bad)
    assert imbalance([1, 1, 1, 1]) == 0.0
    assert imbalance([3, 1, 1, 3]) == pytest.approx(0.5)


def test_run_default_preset_small(capsys):
    """The main job: tiny preset, wide EP over 8 devices, online EPLB, speeds and balance."""
    assert main(["run", "--batch", "2", "--prompt-len", "5", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "online EPLB" in out and "8 cpu devices" in out
    assert re.search(r"prefill: 10 tokens .* -> [\d,]+ tokens/s", out)
    assert re.search(r"decode: 6 tokens .* -> [\d,]+ tokens/s", out)
    assert len(re.findall(r"layer \d: rank imbalance", out)) == 3  # layers 1-3 are MoE


@pytest.mark.parametrize("arch,ep", [("qwen3_moe", 4), ("llama4_text", 2)])
def test_run_checkpoint_with_prompts_is_greedy_and_deterministic(capsys, arch, ep):
    """A Hugging Face checkpoint folder with token-id prompts: the same tokens twice."""
    from pathlib import Path
    folder = str(Path(__file__).resolve().parent / "fixtures" / f"{arch}_tiny")
    args = ["run", "--model", folder, "--ep", str(ep), "--prompt", "1,2,3,4", "--prompt", "5,6",
            "--max-new-tokens", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    tokens = lambda out: [line.split("->")[1] for line in out.splitlines() if line.strip().startswith("[")]
    assert tokens(first) == tokens(second) and len(tokens(first)) == 2
    assert main(["run", "--model", folder, "--prompt", "hello"]) == 2  # no tokenizer: a clear error
    assert "--prompt='hello'" in capsys.readouterr().err
