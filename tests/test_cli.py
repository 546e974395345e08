"""The ``wideep`` console script (run in-process on the emulated CPU devices)."""
from __future__ import annotations

import re

import numpy as np
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
    group_flags = SMALL.index("--n-group"), SMALL.index("--topk-group")
    base = SMALL if "--router" not in extra else [  # the group flags are noaux_tc's only
        arg for i, arg in enumerate(SMALL) if not any(i in (f, f + 1) for f in group_flags)]
    assert main(base + extra) == 0
    out = capsys.readouterr().out
    assert re.search(r"-> [\d,]+ tokens/s", out)
    received = _ints(next(line for line in out.splitlines() if "per-rank" in line and "tokens" in line))
    rows = _ints(next(line for line in out.splitlines() if "expert rows" in line))
    assert len(received) == ep and len(rows) == ep
    assert sum(rows) == 16 * ep * 4  # every (token, k) pair computed exactly once
    # Both backends: a rank runs experts for the tokens with a pair on its slots, each
    # token on at least one rank and no rank more than the EP group's tokens.
    assert sum(received) >= 16 * ep and max(received) <= 16 * ep
    assert ("all-gather + reduce-scatter" in out) == ("CUTLASS" in extra)


def test_bench_moe_with_config_file(capsys, tmp_path):
    cfg = tmp_path / "moe.yaml"
    cfg.write_text("moe_config:\n  backend: WIDEEP\n  max_num_tokens: 5\n  load_balancer:\n    num_slots: 24\n")
    assert main(SMALL + ["--ep", "4", "--config", str(cfg)]) == 0
    assert "(24 slots)" in capsys.readouterr().out


def test_bench_moe_uses_the_config_placement(capsys, tmp_path):
    """A placement file's row is used (the only layer, or --layer-idx's); several layers
    and no --layer-idx is an error naming them, not the default placement."""
    layers = {3: list(range(16)), 5: list(range(12, 16)) + list(range(8, 12)) + list(range(4, 8)) + list(range(4))}

    def config(rows) -> str:
        path = tmp_path / f"moe{len(rows)}.yaml"
        path.write_text("moe_config:\n  backend: WIDEEP\n  load_balancer:\n    num_slots: 16\n"
                        "    initial_global_assignments:\n"
                        + "".join(f"      {layer}: {row}\n" for layer, row in rows.items()))
        return str(path)

    def rows(*extra) -> tuple[str, list[int]]:
        assert main(SMALL + ["--ep", "4", "--skew", "zipf:1.5", *extra]) == 0
        out = capsys.readouterr().out
        return out, _ints(next(line for line in out.splitlines() if "expert rows" in line))

    out3, rows3 = rows("--config", config({3: layers[3]}))
    assert "placement: initial_global_assignments[3]" in out3
    out5, rows5 = rows("--config", config(layers), "--layer-idx", "5")
    assert "placement: initial_global_assignments[5]" in out5
    assert rows5 == rows3[::-1]  # layer 5 puts rank r's experts on rank 3 - r
    assert rows3 != rows3[::-1]
    assert main(SMALL + ["--ep", "4", "--config", config(layers)]) == 2
    assert "--layer-idx: required, the config's initial_global_assignments place layers [3, 5]; allowed: one of " \
           "them" in capsys.readouterr().err
    assert main(SMALL + ["--ep", "4", "--config", config(layers), "--layer-idx", "4"]) == 2
    assert "MoE layer 4 has no placement" in capsys.readouterr().err


def test_bench_moe_errors_name_the_value(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe_config:\n  backend: NOPE\n")
    assert main(SMALL + ["--config", str(bad)]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert main(SMALL + ["--skew", "zipf:-1"]) == 2
    assert "zipf:-1" in capsys.readouterr().err
    assert main(SMALL + ["--ep", "9"]) == 2
    assert "--ep=9: allowed: 1..8" in capsys.readouterr().err


def test_user_errors_are_one_line_before_any_compute(capsys, tmp_path, monkeypatch):
    """Each mistake below stops with exit 2 and one line naming the flag (or variable), the
    value and the rule: before the layer or model is built, not after the run, and no
    traceback (a folder as output file, a file as output folder, non-UTF-8 YAML)."""
    import os

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    other_stats = tmp_path / "other_stats"  # another run's statistics: 99 experts
    other_stats.mkdir()
    (other_stats / "meta_info.json").write_text('{"num_experts": 99, "num_experts_per_token": 2}')
    built = []
    monkeypatch.setattr("wideep_jax.models.CausalLM.__init__", lambda *a, **k: built.append(1) or 1 / 0)
    monkeypatch.setattr("wideep_jax.bench.bench_moe_layer", lambda *a, **k: built.append(1) or 1 / 0)
    cases = [
        (SMALL + ["--config", str(binary)], rf"--config: '{re.escape(str(binary))}' is not UTF-8 text"),
        (SMALL + ["--router", "softmax"], r"--n-group=4, --topk-group=2: allowed only with --router noaux_tc"),
        (SMALL + ["--layer-idx", "3"], r"--layer-idx=3: allowed only with a --config placement"),
        (SMALL + ["--stats-dir", str(a_file / "sub")], r"--stats-dir=.*cannot create that folder"),
        (SMALL + ["--stats-dir", str(other_stats)], r"meta_info.json' holds .*statistics of another shape"),
        (SMALL + ["--cpu-devices", "2000"], r"--cpu-devices=2000: allowed: 1..1024"),
        (["run", "--top-p", "2"], r"--top-p=2.0: allowed: a number with 0 < top_p <= 1"),
        (["run", "--temperature", "-1"], r"--temperature=-1.0: allowed: a finite number >= 0"),
        (["run", "--prompt", "abc"], r"--prompt='abc': allowed: comma-separated token ids"),
        # str.isdigit() takes '²', which int() refuses: was a bare "invalid literal for int()"
        (["run", "--prompt", "1,\u00b2"], r"--prompt='1,\u00b2': allowed: comma-separated token ids"),
        # flags that cannot apply are errors, not silently ignored
        (["run", "--prompt", "1,2", "--batch", "5"], r"--batch=5: allowed only without --prompt"),
        (["run", "--prompt", "1,2", "--prompt-len", "9"], r"--prompt-len=9: allowed only without --prompt"),
        (["run", "--top-p", "0.3"], r"--top-p=0.3: allowed only with --temperature > 0"),
        (["run", "--moe-config", str(binary)], r"--moe-config: .* is not UTF-8 text"),
        (["build-ffi", "--archs", "abc"], r"--archs='abc': allowed: comma-separated GPU archs"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    # --cpu-devices must agree with a count XLA_FLAGS already sets (it cannot change it).
    assert "xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
    assert main(SMALL + ["--cpu-devices", "4"]) == 2
    assert "--cpu-devices=4: XLA_FLAGS already sets --xla_force_host_platform_device_count=8" in capsys.readouterr().err
    monkeypatch.setenv("EXPERT_STATISTIC_ITER_RANGE", "0-2")
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", str(a_file / "stats"))
    assert main(["run", "--max-new-tokens", "3"]) == 2
    assert "EXPERT_STATISTIC_PATH=" in capsys.readouterr().err
    assert not built  # every case failed before building a layer or model


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


def _spy_balancer(monkeypatch):
    """Records, at every online balancer step, each layer's placement that step ran with
    and its measured rows per slot (test only: reading them syncs)."""
    from wideep_jax.eplb.balancer import OnlineBalancer

    seen = []
    step = OnlineBalancer.step

    def spy(self, stats):
        seen.append(([np.asarray(layer.slot_to_expert[...]) for layer in self.layers],
                     np.stack([np.asarray(s.slot_counts) for s in stats]),
                     np.stack([np.asarray(s.expert_counts) for s in stats]), self))
        return step(self, stats)
    monkeypatch.setattr(OnlineBalancer, "step", spy)
    return seen


def test_run_default_preset_small(capsys, monkeypatch):
    """The main job: tiny preset, wide EP over 8 devices, online EPLB, speeds and balance.
    The rank imbalance is what ran: each step's rows under that step's placement, not the
    run's counts projected onto the placement online EPLB left at the end."""
    from wideep_jax.eplb.algorithm import rank_loads

    seen = _spy_balancer(monkeypatch)
    assert main(["run", "--batch", "8", "--prompt-len", "16", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "online EPLB" in out and "8 cpu devices" in out
    assert re.search(r"prefill: 128 tokens .* -> [\d,]+ tokens/s", out)
    assert re.search(r"decode: 24 tokens .* -> [\d,]+ tokens/s", out)
    assert "measured under each step's placement: per step (mean of 4 steps) and over the run" in out
    printed = np.array([[float(v) for v in m] for m in re.findall(
        r"layer \d: rank imbalance ([\d.]+) per step, ([\d.]+) over the run; busiest expert", out)])
    assert printed.shape == (3, 2)  # layers 1-3 are MoE

    placements = np.stack([np.stack(p) for p, *_ in seen])  # [steps, layers, slots], before each step's update
    rows = np.stack([r for _, r, *_ in seen]).astype(float)
    assert len(seen) == 4 and rows.sum(-1)[:, 0].tolist() == [128 * 4] + [8 * 4] * 3  # every pair once
    changed = (placements[1:] != placements[:1]).any((0, 2))
    assert changed.any(), "online EPLB re-placed no layer: the test would not tell the projections apart"
    ranks = rows.reshape(4, 3, 8, -1).sum(-1)  # [steps, layers, ranks]: slot s on rank s // 5
    imb = lambda load: (load.max(-1) - load.mean(-1)) / load.mean(-1)  # noqa: E731
    np.testing.assert_allclose(printed[:, 0], imb(ranks).mean(0), atol=5e-4)
    np.testing.assert_allclose(printed[:, 1], imb(ranks.sum(0)), atol=5e-4)
    # What was printed before: the run's counts projected onto the placement left at the end.
    final = np.stack([np.asarray(layer.slot_to_expert[...]) for layer in seen[-1][3].layers])
    total = np.stack([c for _, _, c, _ in seen]).sum(0)
    old = imb(np.asarray(rank_loads(total, final, 8)))
    assert np.abs(old - printed[:, 1])[changed].min() > 1e-3


def test_run_placement_file_for_every_moe_layer(tmp_path, capsys, monkeypatch):
    """A static placement file for the tiny preset's MoE layers 1..3 runs, and the printed
    imbalance says it is projected (no statistics come back without a balancer); one
    that leaves a MoE layer out, or names the dense layer 0, stops before the model is built."""
    from wideep_jax.eplb.algorithm import imbalance as rank_imbalance, rank_loads
    from wideep_jax.models import generate as generate_module

    # 40 slots, 5 per rank: replicas of experts 16..23 on ranks 6 and 7, none beside its expert.
    rows = {layer: [(e + 3 * layer) % 32 for e in range(32)] + list(range(16, 24)) for layer in (1, 2, 3)}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("moe_config:\n  backend: WIDEEP\n  load_balancer: lb.yaml\n")
    args = ["run", "--moe-config", str(cfg), "--batch", "2", "--prompt-len", "5", "--max-new-tokens", "2"]

    def write(layers):
        text = "".join(f"  {layer}: {rows.get(layer, rows[1])}\n" for layer in layers)
        (tmp_path / "lb.yaml").write_text(f"num_slots: 40\ninitial_global_assignments:\n{text}")

    results = []
    generate = generate_module.generate

    def keep(*positional, **keywords):  # the run's expert counts, to project them here too
        results.append(generate(*positional, **keywords))
        return results[-1]
    monkeypatch.setattr(generate_module, "generate", keep)
    write([1, 2, 3])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "online EPLB" not in out and "projected: the run's routed pairs on the static placement" in out
    printed = [float(v) for v in re.findall(r"layer \d: rank imbalance ([\d.]+) over the run \(projected\)", out)]
    want = [float(rank_imbalance(rank_loads(counts, rows[layer], 8)))
            for layer, counts in zip((1, 2, 3), results[0].expert_counts)]
    np.testing.assert_allclose(printed, want, atol=5e-4)

    iga = "moe_config.load_balancer.initial_global_assignments: "
    allowed = "allowed: a placement for every MoE layer of the model, or no initial_global_assignments"
    for layers, problem in (([1, 3], "MoE layers [2] have no placement (it has layers [1, 3]"),
                            ([0, 1, 2, 3], "layers [0] are not MoE layers of this model (it has layers [0..3]")):
        write(layers)
        assert main(args) == 2
        captured = capsys.readouterr()
        assert iga + problem + ", the model's MoE layers are [1..3]); " + allowed in captured.err
        assert "wideep run:" not in captured.out  # refused before the model was built
    assert len(results) == 1


def test_run_default_preset_on_one_device(capsys):
    """One device (a one-GPU machine, or --ep 1): every expert on the one rank, no
    replicas and no online balancing, instead of a slot count the rules refuse."""
    assert main(["run", "--ep", "1", "--batch", "2", "--prompt-len", "5", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "online EPLB" not in out
    assert re.search(r"decode: 4 tokens .* -> [\d,]+ tokens/s", out)


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
    missing = str(Path(folder).parent / "no_such_checkpoint")
    assert main(["run", "--model", missing, "--prompt", "1,2"]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("wideep: error:") and "no_such_checkpoint" in err and "Traceback" not in err


# -- offline EPLB step 1 with the main job, and TensorRT-LLM's flag spellings ---------------

def _run_with_stats(monkeypatch, stats_dir, span, args):
    monkeypatch.setenv("EXPERT_STATISTIC_ITER_RANGE", span)
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", str(stats_dir))
    return main(["run", *args])


def test_run_records_expert_statistics(tmp_path, monkeypatch, capsys):
    """TensorRT-LLM's step 1: ``wideep run`` with the statistics variables writes per-rank
    counts of iterations A..B-1 (0 = the prefill, then one per decode step), with the
    online balancer running too; step 2 reads them."""
    from wideep_jax.config import load_moe_config
    from wideep_jax.eplb.stats_files import load_stats

    stats_dir = tmp_path / "stats"
    lengths = [1, 2, 3, 4, 5, 6, 7, 3]  # left-padded to 7: padding must not be counted
    prompts = [",".join(str(10 + i) for i in range(n)) for n in lengths]
    # 3 new tokens: iterations 0..2, the range keeps 0..1 (iteration 2 must be left out).
    args = ["--max-new-tokens", "3"] + [a for p in prompts for a in ("--prompt", p)]
    assert _run_with_stats(monkeypatch, stats_dir, "0-2", args) == 0
    out = capsys.readouterr().out
    assert "online EPLB" in out
    assert f"expert statistics: iterations 0..1 -> {stats_dir}/ (meta_info.json, rank0..7.safetensors)" in out
    stats = load_stats(stats_dir)
    assert (stats.iters, stats.layers, stats.ep_size) == ([0, 1], [1, 2, 3], 8)  # layer 0 is dense
    assert (stats.num_experts, stats.top_k) == (32, 4)
    top_k = 4
    # Summed over ranks: every valid token's top-k pairs once per MoE layer.
    assert stats.counts.sum(-1).tolist() == [[sum(lengths) * top_k] * 3, [len(lengths) * top_k] * 3]
    # Attention is data parallel over EP: with 8 sequences on 8 ranks, rank r's tokens are
    # sequence r's (its prompt in the prefill, one token per decode step).
    per_rank = stats.per_rank.sum(-1)  # [R, I, L]
    assert per_rank[:, 0].tolist() == [[n * top_k] * 3 for n in lengths]
    assert per_rank[:, 1].tolist() == [[top_k] * 3] * 8

    # Step 2, the statistics path taken from EXPERT_STATISTIC_PATH (still set).
    out_file = tmp_path / "lb.yaml"
    assert main(["eplb", "generate", "--num-slots", "40", "-o", str(out_file)]) == 0
    assert "3 layers, 32 experts in 40 slots over 8 ranks (static)" in capsys.readouterr().out
    lb = load_moe_config({"backend": "WIDEEP", "load_balancer": str(out_file)}, num_experts=32,
                         ep_size=8).load_balancer
    assert lb.num_slots == 40 and sorted(lb.initial_global_assignments) == [1, 2, 3]


def test_run_statistics_range_past_the_end(tmp_path, monkeypatch, capsys):
    """A range longer than the run keeps what was recorded and says so; one that starts
    after the run's last iteration fails before the run, writing nothing."""
    from wideep_jax.eplb.stats_files import load_stats

    stats_dir = tmp_path / "stats"
    small = ["--batch", "2", "--prompt-len", "3", "--max-new-tokens", "4"]  # iterations 0..3
    assert _run_with_stats(monkeypatch, stats_dir, "2-50", small) == 0
    out = capsys.readouterr().out
    assert ("expert statistics: iterations 2..3 only: the run ended there "
            "(EXPERT_STATISTIC_ITER_RANGE asked for 2..49)") in out
    stats = load_stats(stats_dir)
    assert stats.iters == [2, 3]
    assert stats.counts.sum(-1).tolist() == [[2 * 4] * 3] * 2  # 2 sequences x top-4, each decode step

    late = tmp_path / "late"
    assert _run_with_stats(monkeypatch, late, "4-9", small) == 2
    err = capsys.readouterr().err
    assert "EXPERT_STATISTIC_ITER_RANGE='4-9': this run has iterations 0..3" in err
    assert "--max-new-tokens=4" in err and not late.exists()
    assert _run_with_stats(monkeypatch, late, "9-4", small) == 2
    assert "EXPERT_STATISTIC_ITER_RANGE='9-4': allowed: 'A-B' with A < B" in capsys.readouterr().err


def _write_stats(path, rng, *, ranks=4, iters=(0, 1, 2, 3), layers=(1, 3), experts=16, top_k=2):
    from wideep_jax.eplb.stats_files import StatsRecorder

    rec = StatsRecorder(path, iters[0], iters[-1] + 1, num_experts=experts, top_k=top_k)
    for i in iters:
        for layer in layers:
            p = 1.0 / (rng.permutation(experts) + 1.0) ** 1.3
            rec.record(i, layer, rng.multinomial(64 * top_k, p / p.sum(), size=ranks).astype(np.int32))
    return rec.save()


def test_eplb_trtllm_flag_spellings(tmp_path, rng, monkeypatch, capsys):
    """generate_eplb_config.py / report_load_statistics.py spellings give what ours give."""
    from wideep_jax.config import load_moe_config

    monkeypatch.delenv("EXPERT_STATISTIC_PATH", raising=False)
    stats = str(_write_stats(tmp_path / "stats", rng))
    ours, theirs = tmp_path / "ours.yaml", tmp_path / "theirs.yaml"
    assert main(["eplb", "generate", "--stats", stats, "--ep-size", "4", "--num-slots", "24", "--iter-start", "1",
                 "--iter-stop", "3", "--layer-updates-per-iter", "2", "-o", str(ours)]) == 0
    assert main(["eplb", "generate", "--expert_statistic_path", stats, "--ep_size", "4", "--num_slots", "24",
                 "--iter_start", "1", "--iter_stop", "3", "--layer_updates_per_iter", "2",
                 "--output_path", str(theirs)]) == 0
    assert "(online, 2 layer(s) per iteration)" in capsys.readouterr().out
    assert ours.read_text() == theirs.read_text()
    assert "\nlayer_updates_per_iter: 2\n" in theirs.read_text()
    lb = load_moe_config({"backend": "WIDEEP", "load_balancer": str(theirs)}, num_experts=16,
                         ep_size=4).load_balancer
    assert lb.layer_updates_per_iter == 2 and lb.is_online and sorted(lb.initial_global_assignments) == [1, 3]

    reports = []
    for argv in (["--stats", stats, "--ep-size", "4", "--placement", str(ours), "--iter-start", "1"],
                 ["--expert_statistic_path", stats, "--ep_size", "4", "--projection_eplb_config_path", str(ours),
                  "--iter_start", "1"]):
        assert main(["eplb", "report", *argv, "--no-heatmap"]) == 0
        reports.append(capsys.readouterr().out)
    assert reports[0] == reports[1] and "rank imb (placed)" in reports[0]
    assert "mean, std: of the load per rank" in reports[0] and "rank files" not in reports[0]
    # --per_expert (TensorRT-LLM's spelling too): mean and std over the slots.
    for flag in ("--per-expert", "--per_expert"):
        assert main(["eplb", "report", "--stats", stats, "--ep-size", "4", "--placement", str(ours), "--no-heatmap",
                     flag]) == 0
        out = capsys.readouterr().out
        assert "mean, std: of the load per slot" in out
        assert out.splitlines()[-1].split()[1] != reports[0].splitlines()[-1].split()[1]  # another mean
    # The EP size defaulted from the rank files while a placement is projected: said, since a
    # placement made for another EP size whose slots the rank count divides projects silently.
    assert main(["eplb", "report", "--stats", stats, "--placement", str(ours), "--no-heatmap"]) == 0
    assert "the statistics' rank files (the placement file names no ep_size); pass --ep-size N" in \
        capsys.readouterr().out


def test_eplb_statistics_path_default_and_errors(tmp_path, rng, monkeypatch, capsys):
    """The statistics path defaults to $EXPERT_STATISTIC_PATH, else is required; a negative
    --layer_updates_per_iter stops at parsing with the flag, the value and the rule."""
    stats = str(_write_stats(tmp_path / "stats", rng))
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", stats)
    assert main(["eplb", "report", "--no-heatmap"]) == 0
    assert f"wideep eplb report: {stats}," in capsys.readouterr().out
    assert main(["eplb", "generate", "-o", str(tmp_path / "lb.yaml")]) == 0
    assert "\nlayer_updates_per_iter: 0\n" in (tmp_path / "lb.yaml").read_text()
    capsys.readouterr()
    for flag in ("--layer_updates_per_iter", "--layer-updates-per-iter"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eplb", "generate", flag, "-1"])
        assert exit_info.value.code == 2
        assert ("argument --layer-updates-per-iter/--layer_updates_per_iter: '-1': allowed: an int >= 0"
                in capsys.readouterr().err)
    monkeypatch.delenv("EXPERT_STATISTIC_PATH")
    for command in ("generate", "report"):
        with pytest.raises(SystemExit):
            main(["eplb", command])
        assert "required: --stats/--expert_statistic_path" in capsys.readouterr().err


def test_override_and_layer_flag_errors_name_the_flag(capsys, tmp_path, monkeypatch):
    """Found in review: ``--alltoall ''`` was ignored (the config's backend ran), a bad
    ``--alltoall`` or an override the config refuses named only the config key, a layer
    the router flags cannot make named RouterSpec fields (n_group=8 that no flag set), a
    Pallas expert_kernel with float32 weights failed inside the kernel after the model was
    built, and a missing --stats folder named no flag. Each is now one line naming the flag,
    value and rule, before any layer or model is built."""
    online = tmp_path / "online.yaml"
    online.write_text("moe_config: {backend: WIDEEP, load_balancer: {num_slots: 16, layer_updates_per_iter: 1}}\n")
    pallas = tmp_path / "pallas.yaml"
    pallas.write_text("moe_config: {backend: WIDEEP, expert_kernel: mosaic_gpu}\n")
    built = []
    monkeypatch.setattr("wideep_jax.models.CausalLM.__init__", lambda *a, **k: built.append(1) or 1 / 0)
    monkeypatch.setattr("wideep_jax.bench.bench_moe_layer", lambda *a, **k: built.append(1) or 1 / 0)
    for value in ("", "foo"):
        with pytest.raises(SystemExit) as exit_info:
            main(SMALL + ["--alltoall", value])
        assert exit_info.value.code == 2
        assert f"argument --alltoall: invalid choice: '{value}'" in capsys.readouterr().err
    cases = [
        (SMALL + ["--experts", "10"], r"--experts 10 --top-k 4 --router noaux_tc --n-group 4 --topk-group 2: "
                                      r"RouterSpec.n_group=4: must divide num_experts \(10\)"),
        (SMALL + ["--top-k", "17"],
         r"--experts 16 --top-k 17 --router noaux_tc --n-group 4 --topk-group 2: .*top_k"),
        (SMALL + ["--config", str(online), "--backend", "cutlass"],
         r"--backend CUTLASS over --config .*online.yaml: moe_config.load_balancer.layer_updates_per_iter: got 1"),
        (SMALL + ["--config", str(pallas)], r"--config: moe_config.expert_kernel='mosaic_gpu' takes bfloat16 or "
                                            r"float16 weights, got --dtype float32 \(the default on this platform\)"),
        (["run", "--moe-config", str(pallas), "--dtype", "float32"],
         r"--moe-config: moe_config.expert_kernel='mosaic_gpu' takes .* got --dtype float32; allowed: --dtype "
         r"bfloat16, or expert_kernel auto or xla"),
        (["eplb", "generate", "--stats", str(tmp_path / "none")],
         r"--stats='.*none': statistics directory .* not found; allowed: a statistics directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    assert not built


def test_backend_and_alltoall_flags_are_case_insensitive(capsys):
    """As the config's own values are (``backend: wideep`` loads): ``--backend wideep`` was refused."""
    assert main(SMALL + ["--ep", "2", "--backend", "wideep", "--alltoall", "XLA"]) == 0
    assert "wideep bench-moe: WIDEEP (xla all-to-all), EP 2" in capsys.readouterr().out


def test_closed_stdout_reader_stops_quietly():
    """``wideep ... | head``: the reader leaving early ends the command with exit 1 and no
    error line or traceback (a BrokenPipeError is an OSError, once reported as an error)."""
    import subprocess
    import sys

    # A sub-command that prints far more than a pipe buffer, added the way the real ones are.
    script = (
        "import sys\n"
        "from wideep_jax import cli\n"
        "real = cli._add_build_ffi\n"
        "def add(sub):\n"
        "    real(sub)\n"
        "    p = sub.add_parser('spam')\n"
        "    p.set_defaults(func=lambda args: [print('x' * 100) for _ in range(100_000)] and 0)\n"
        "cli._add_build_ffi = add\n"
        "sys.exit(cli.main(['spam']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"x" * 100 + b"\n"
    proc.stdout.close()   # the reader goes away with most of the output unread
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err == b"", err
