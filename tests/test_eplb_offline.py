"""Offline EPLB: statistics files (TensorRT-LLM's format), placement generation, report, CLI."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moe_helpers import make_layer, make_spec, random_routing, random_tokens, run_layer
from wideep_jax.cli import main
from wideep_jax.config import ConfigError, ConfigWarning, default_placement, load_moe_config
from wideep_jax.eplb.offline import (Placements, format_report, generate_placement, report, save_heatmap,
                                     write_placement_file)
from wideep_jax.eplb.stats_files import (StatsFileError, StatsRecorder, load_stats,
                                         parse_iter_range)

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
SMALL = ["bench-moe", "--hidden", "32", "--intermediate", "16", "--experts", "16", "--top-k", "4",
         "--n-group", "4", "--topk-group", "2", "--tokens", "16", "--iters", "1"]


def write_trtllm_stats(path, counts: np.ndarray, *, iters, layers, top_k=2, dtype=np.int64):
    """A TensorRT-LLM-style writer: counts [R, I, L, E] -> meta_info.json + rank{r}.safetensors
    (torch.bincount gives int64), plus the other files TensorRT-LLM leaves in the directory."""
    path.mkdir(parents=True, exist_ok=True)
    num_ranks, _, _, num_experts = counts.shape
    (path / "meta_info.json").write_text(json.dumps({"num_experts": num_experts, "num_experts_per_token": top_k}))
    for r in range(num_ranks):
        save_file({f"{i}_{l}": counts[r, a, b].astype(dtype) for a, i in enumerate(iters)
                   for b, l in enumerate(layers)}, str(path / f"rank{r}.safetensors"))
        # Not counts: must be ignored by the reader (different keys and shapes).
        junk = {"x": np.zeros((3, 5), np.int32)}
        for name in (f"rank{r}_raw", f"cooccurrence_rank{r}", f"token_selected_experts_rank{r}"):
            save_file(junk, str(path / f"{name}.safetensors"))
    return path


def zipf_counts(rng, num_ranks, num_iters, num_layers, num_experts, tokens=256, top_k=2, s=1.3):
    """[R, I, L, E] skewed counts: Zipf(s) popularity over a random expert order per layer."""
    out = np.zeros((num_ranks, num_iters, num_layers, num_experts), np.int64)
    for b in range(num_layers):
        p = 1.0 / (rng.permutation(num_experts) + 1.0) ** s
        out[:, :, b] = rng.multinomial(tokens * top_k, p / p.sum(), size=(num_ranks, num_iters))
    return out


# -- recording -----------------------------------------------------------------------------

@pytest.mark.parametrize("max_num_tokens", [None, 3])
def test_recorder_round_trip_matches_bincount(tmp_path, rng, max_num_tokens):
    ep, num_experts, top_k, num_tokens = 4, 16, 2, 32
    spec = make_spec(experts=num_experts, top_k=top_k)
    layer = make_layer(spec, ep=ep, max_num_tokens=max_num_tokens)
    rec = StatsRecorder(tmp_path / "stats", 10, 12, num_experts=num_experts, top_k=top_k)
    expected: dict[str, np.ndarray] = {}
    # Iteration 11, layer 3 has two MoE calls (as chunked prefill): their counts add up.
    calls = [(9, 3), (10, 3), (10, 5), (11, 3), (11, 3), (11, 5)]
    for iteration, layer_idx in calls:
        x = random_tokens(rng, num_tokens, spec.hidden_size)
        routing = random_routing(rng, num_tokens, num_experts, top_k)
        _, stats = run_layer(layer, x, routing=routing)
        rec.record(iteration, layer_idx, stats)
        if iteration < 10:
            continue
        ids = np.asarray(routing.ids).reshape(ep, num_tokens // ep, top_k)  # contiguous token split
        want = np.stack([np.bincount(ids[r].ravel(), minlength=num_experts) for r in range(ep)])
        key = f"{iteration}_{layer_idx}"
        expected[key] = expected.get(key, 0) + want
    assert isinstance(rec._records[(11, 3)], jax.Array)  # kept on device until saved
    assert not rec.done and not (tmp_path / "stats").exists()
    rec.record(12, 3, stats)  # first iteration >= iter_stop: saves, records nothing
    assert rec.done and rec.saved

    files = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert files == ["meta_info.json"] + [f"rank{r}.safetensors" for r in range(ep)]
    meta = json.loads((tmp_path / "stats" / "meta_info.json").read_text())
    assert meta == {"num_experts": num_experts, "num_experts_per_token": top_k}
    for r in range(ep):
        data = load_file(str(tmp_path / "stats" / f"rank{r}.safetensors"))
        assert sorted(data) == sorted(expected)
        for key, value in data.items():
            assert value.dtype == np.int32 and value.shape == (num_experts,)
            np.testing.assert_array_equal(value, expected[key][r], err_msg=f"rank {r} key {key}")

    loaded = load_stats(tmp_path / "stats")
    assert (loaded.ep_size, loaded.iters, loaded.layers) == (ep, [10, 11], [3, 5])
    np.testing.assert_array_equal(loaded.counts[1, 0], expected["11_3"].sum(0))
    np.testing.assert_array_equal(loaded.per_rank[2, 0, 1], expected["10_5"][2])


def test_recorder_arrays_step_and_checks(tmp_path):
    rec = StatsRecorder(tmp_path / "s", 0, 2, num_experts=4, top_k=1)
    rec.record(0, 0, np.array([[1, 0, 0, 0], [0, 2, 0, 0]], np.int32))
    rec.record(1, 0, np.array([[0, 0, 0, 1], [0, 0, 3, 0]], np.int32))
    with pytest.raises(ValueError, match="3 ranks; allowed: 2"):
        rec.record(1, 0, np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match=r"\(2, 5\).*num_experts=4"):
        rec.record(1, 0, np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match="float32"):
        rec.record(1, 0, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda c: rec.record(1, 0, c) or c)(np.zeros((2, 4), np.int32))
    rec.step(2)
    assert rec.done and load_stats(tmp_path / "s").counts.tolist() == [[[1, 2, 0, 0]], [[0, 0, 3, 1]]]
    # Every file as the umask makes a new one (safetensors alone writes 0600).
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "s").iterdir()}
    assert set(modes.values()) == {modes["meta_info.json"]}, modes

    # A caller that reuses one buffer must not rewrite the iterations recorded before.
    reuse = StatsRecorder(tmp_path / "r", 0, 3, num_experts=4, top_k=1)
    buffer = np.zeros((1, 4), np.int32)
    for it in range(3):
        buffer[:] = 0
        buffer[0, it] = 5
        reuse.record(it, 0, buffer)
    reuse.step(3)
    assert load_stats(tmp_path / "r").counts[:, 0].tolist() == [[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0]]

    empty = StatsRecorder(tmp_path / "e", 5, 6, num_experts=4, top_k=1)
    with pytest.raises(ValueError, match=r"nothing was recorded in iterations \[5, 6\)"):
        empty.save()
    with pytest.raises(ValueError, match="iter_start=3, iter_stop=3"):
        StatsRecorder(tmp_path, 3, 3, num_experts=4, top_k=1)


def test_recorder_removes_stale_rank_files(tmp_path):
    write_trtllm_stats(tmp_path, np.ones((4, 1, 1, 4), np.int64), iters=[0], layers=[0])
    rec = StatsRecorder(tmp_path, 0, 1, num_experts=4, top_k=2)
    rec.record(0, 0, np.ones((2, 4), np.int32))
    rec.save()
    assert load_stats(tmp_path).ep_size == 2


def test_recorder_refuses_a_folder_of_other_statistics(tmp_path, rng):
    """Statistics of another shape (another meta_info.json) are not overwritten: their
    rank files would be replaced and TensorRT-LLM's other files of the old shape kept."""
    num_experts, top_k = int(rng.integers(4, 12)), int(rng.integers(1, 4))
    old = write_trtllm_stats(tmp_path / "old", rng.integers(0, 9, (3, 2, 2, num_experts)), iters=[0, 1],
                             layers=[1, 2], top_k=top_k)
    before = {f.name: f.read_bytes() for f in old.iterdir()}
    theirs = json.dumps({"num_experts": num_experts, "num_experts_per_token": top_k})
    for mine in ({"num_experts": num_experts + 1, "top_k": top_k}, {"num_experts": num_experts, "top_k": top_k + 1}):
        ours = json.dumps({"num_experts": mine["num_experts"], "num_experts_per_token": mine["top_k"]})
        with pytest.raises(StatsFileError, match=re.escape(
                f"meta_info.json' holds {theirs}, statistics of another shape than this recorder's {ours}; "
                f"allowed: a new or empty folder")):
            StatsRecorder(old, 0, 1, **mine)
    # A recorder made before the folder was written refuses at save, writing nothing.
    late = StatsRecorder(tmp_path / "late", 0, 1, num_experts=num_experts + 2, top_k=top_k)
    late.record(0, 1, rng.integers(0, 9, (2, num_experts + 2)).astype(np.int32))
    write_trtllm_stats(tmp_path / "late", rng.integers(0, 9, (3, 1, 1, num_experts)), iters=[0], layers=[1],
                       top_k=top_k)
    with pytest.raises(StatsFileError, match="statistics of another shape"):
        late.save()
    assert load_stats(tmp_path / "late").num_experts == num_experts and not late.saved
    assert {f.name: f.read_bytes() for f in old.iterdir()} == before
    # Rank files without meta_info.json, or an unreadable one: of unknown shape, also refused.
    (old / "meta_info.json").unlink()
    with pytest.raises(StatsFileError, match=r"holds rank0\.safetensors, rank1\.safetensors, rank2\.safetensors "
                                             r"but no meta_info\.json"):
        StatsRecorder(old, 0, 1, num_experts=num_experts, top_k=top_k)
    (old / "meta_info.json").write_text("{num_experts: 8")
    with pytest.raises(StatsFileError, match="meta_info.json' exists but is not readable JSON"):
        StatsRecorder(old, 0, 1, num_experts=num_experts, top_k=top_k)
    # Same shape: overwritten (a re-recording), every old count replaced.
    (old / "meta_info.json").write_text(theirs)
    same = StatsRecorder(old, 5, 6, num_experts=num_experts, top_k=top_k)
    same.record(5, 7, np.ones((2, num_experts), np.int32))
    same.save()
    again = load_stats(old)
    assert (again.iters, again.layers, again.ep_size) == ([5], [7], 2)


def test_recorder_writes_nothing_the_loader_refuses(tmp_path, rng):
    num_experts = int(rng.integers(2, 12))
    with pytest.raises(ValueError, match=re.escape(f"top_k={num_experts + 1}: allowed: an int in "
                                                   f"[1, num_experts = {num_experts}]")):
        StatsRecorder(tmp_path / "k", 0, 1, num_experts=num_experts, top_k=num_experts + 1)
    rec = StatsRecorder(tmp_path / "neg", 0, 2, num_experts=num_experts, top_k=1)
    counts = rng.integers(0, 9, (2, 3, num_experts)).astype(np.int32)
    a, r, e = (int(rng.integers(n)) for n in counts.shape)
    counts[a, r, e] = -int(rng.integers(1, 50))
    for i in range(2):
        rec.record(i, 4, counts[i])
    with pytest.raises(ValueError, match=re.escape(f"counts of iteration {a}, layer 4, rank {r} have "
                                                   f"{counts[a, r, e]} for expert {e}; allowed: counts >= 0")):
        rec.save()
    assert not (tmp_path / "neg").exists()


def test_parse_iter_range_and_env(monkeypatch, tmp_path):
    assert parse_iter_range("100-200") == (100, 200) and parse_iter_range(" 3 - 4 ") == (3, 4)
    for bad in ("100", "a-b", "5-5", "7-3", "-1-4", "1-2-3"):
        with pytest.raises(ValueError, match=re.escape(f"EXPERT_STATISTIC_ITER_RANGE={bad!r}")):
            parse_iter_range(bad)
    monkeypatch.delenv("EXPERT_STATISTIC_ITER_RANGE", raising=False)
    assert StatsRecorder.from_env(8, 2) is None
    monkeypatch.setenv("EXPERT_STATISTIC_ITER_RANGE", "5-9")
    monkeypatch.delenv("EXPERT_STATISTIC_PATH", raising=False)
    rec = StatsRecorder.from_env(8, 2)
    assert (str(rec.path), rec.iter_start, rec.iter_stop) == ("expert_statistic", 5, 9)
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", str(tmp_path))
    assert StatsRecorder.from_env(8, 2).path == tmp_path


# -- loading -------------------------------------------------------------------------------

def test_load_stats_reads_trtllm_files(tmp_path, rng):
    counts = rng.integers(0, 50, (2, 4, 3, 8))
    write_trtllm_stats(tmp_path, counts, iters=[7, 8, 9, 10], layers=[3, 4, 60])
    stats = load_stats(tmp_path)
    assert (stats.ep_size, stats.iters, stats.layers, stats.num_experts, stats.top_k) == (
        2, [7, 8, 9, 10], [3, 4, 60], 8, 2)
    assert stats.counts.dtype == np.int64
    np.testing.assert_array_equal(stats.counts, counts.sum(0))
    np.testing.assert_array_equal(stats.per_rank, counts)
    part = load_stats(tmp_path, iter_start=8, iter_stop=10)
    assert part.iters == [8, 9] and (part.iter_start, part.iter_stop) == (8, 10)
    np.testing.assert_array_equal(part.load(), counts[:, 1:3].sum((0, 1)))


def test_load_stats_errors_name_the_problem(tmp_path, rng):
    counts = rng.integers(0, 9, (2, 3, 2, 4))
    with pytest.raises(StatsFileError, match="nowhere"):
        load_stats(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StatsFileError, match="meta_info.json"):
        load_stats(tmp_path / "empty")
    gap = write_trtllm_stats(tmp_path / "gap", counts, iters=[1, 2, 4], layers=[0, 1])
    with pytest.raises(StatsFileError, match="iteration 3 missing"):
        load_stats(gap)
    hole = write_trtllm_stats(tmp_path / "hole", counts, iters=[1, 2, 3], layers=[0, 1])
    for r in range(2):
        data = load_file(str(hole / f"rank{r}.safetensors"))
        del data["2_1"]
        save_file(data, str(hole / f"rank{r}.safetensors"))
    with pytest.raises(StatsFileError, match="'2_1'"):
        load_stats(hole)
    with pytest.raises(StatsFileError, match=r"iterations \[0, 3\).*\[1, 4\)"):
        load_stats(hole, iter_start=0, iter_stop=3)
    with pytest.raises(StatsFileError, match="iter_start=3, iter_stop=3"):
        load_stats(hole, iter_start=3, iter_stop=3)
    bad_key = write_trtllm_stats(tmp_path / "key", counts, iters=[1, 2, 3], layers=[0, 1])
    save_file({"1_0": counts[0, 0, 0], "iter1": counts[0, 0, 0]}, str(bad_key / "rank1.safetensors"))
    with pytest.raises(StatsFileError, match=r"rank1\.safetensors.*'iter1'"):
        load_stats(bad_key)
    shape = write_trtllm_stats(tmp_path / "shape", counts, iters=[1, 2, 3], layers=[0, 1])
    save_file({"1_0": np.zeros(5, np.int32)}, str(shape / "rank0.safetensors"))
    with pytest.raises(StatsFileError, match=r"'1_0' has shape \[5\].*num_experts=4"):
        load_stats(shape)
    ranks = write_trtllm_stats(tmp_path / "ranks", counts, iters=[1, 2, 3], layers=[0, 1])
    (ranks / "rank1.safetensors").rename(ranks / "rank2.safetensors")
    with pytest.raises(StatsFileError, match=r"missing rank1\.safetensors"):
        load_stats(ranks)


@pytest.mark.parametrize("bad", [{"iter_start": 1.9}, {"iter_stop": 2.5}, {"iter_start": True},
                                 {"iter_start": "2"}, {"iter_stop": -1}])
def test_load_stats_refuses_iteration_arguments_that_are_not_ints(tmp_path, rng, bad):
    """int() truncated 1.9 to 1 (a silently different range) and named no argument for a string."""
    stats = write_trtllm_stats(tmp_path, rng.integers(0, 9, (2, 3, 1, 4)), iters=[1, 2, 3], layers=[0])
    (key, value), = bad.items()
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}: allowed: an int >= 0")):
        load_stats(stats, **bad)
    assert load_stats(stats, iter_start=np.int64(2)).iters == [2, 3]


def test_load_stats_refuses_negative_counts(tmp_path, rng, capsys):
    counts = rng.integers(0, 50, (3, 3, 2, 8))
    r, a, b, e = (int(rng.integers(n)) for n in counts.shape)
    value = -int(rng.integers(1, 100))
    counts[r, a, b, e] = value
    path = write_trtllm_stats(tmp_path, counts, iters=[4, 5, 6], layers=[2, 9])
    i, l = 4 + a, [2, 9][b]
    want = (f"rank{r}.safetensors': key '{i}_{l}' (iteration {i}, layer {l}) has count {value} for expert {e}; "
            "allowed: counts >= 0")
    with pytest.raises(StatsFileError, match=re.escape(want)):
        load_stats(path)
    for command in ("report", "generate"):  # report printed a table of them, exit 0
        assert main(["eplb", command, "--stats", str(path), "--no-heatmap" if command == "report" else "-o",
                     *([] if command == "report" else [str(tmp_path / "lb.yaml")])]) == 2
        assert want in capsys.readouterr().err
    assert not (tmp_path / "lb.yaml").exists()


def test_load_stats_refuses_top_k_above_num_experts(tmp_path, rng):
    num_experts = int(rng.integers(2, 40))
    path = write_trtllm_stats(tmp_path, rng.integers(0, 9, (2, 2, 1, num_experts)), iters=[0, 1], layers=[3],
                              top_k=num_experts)
    assert load_stats(path).top_k == num_experts  # every expert per token: allowed
    top_k = num_experts + int(rng.integers(1, 400))
    (path / "meta_info.json").write_text(json.dumps({"num_experts": num_experts, "num_experts_per_token": top_k}))
    with pytest.raises(StatsFileError, match=re.escape(
            f"meta_info.json': num_experts_per_token={top_k}; allowed: an int in [1, num_experts = {num_experts}]")):
        load_stats(path)


# -- generate and report -------------------------------------------------------------------

def _numpy_report(counts, placement, ep, per_expert=False):
    """Per layer [mean, std, rank imb, slot imb], per iteration then averaged (loops); mean and
    std over the ranks (TensorRT-LLM's report_load_statistics.py), over the slots with per_expert."""
    def imb(v):
        return (v.max() - v.mean()) / v.mean()
    num_iters, num_layers, num_experts = counts.shape
    out = []
    for b in range(num_layers):
        rows = []
        for a in range(num_iters):
            c = counts[a, b].astype(np.float64)
            p = placement[b]
            slot = c[p] / np.bincount(p, minlength=num_experts)[p]
            rank = slot.reshape(ep, -1).sum(1)
            spread = slot if per_expert else rank
            rows.append([spread.mean(), spread.std(ddof=1), imb(rank), imb(slot)])
        out.append(np.mean(rows, axis=0))
    return np.array(out)


def test_generate_write_load_and_report(tmp_path, rng):
    ep, num_experts, num_slots, layers = 8, 32, 40, [3, 4, 5]
    counts = zipf_counts(rng, 4, 5, len(layers), num_experts)
    stats = load_stats(write_trtllm_stats(tmp_path / "stats", counts, iters=range(20, 25), layers=layers))
    placement = generate_placement(stats, ep_size=ep, num_slots=num_slots)
    assert sorted(placement) == layers
    path = write_placement_file(tmp_path / "lb.yaml", placement, num_slots)
    text = path.read_text()
    assert "layer_updates_per_iter: 0" in text and re.search(r"^  3: \[\d+, \d+", text, re.M)
    cfg = load_moe_config({"backend": "WIDEEP", "load_balancer": str(path)}, num_experts=num_experts, ep_size=ep)
    assert cfg.load_balancer.num_slots == num_slots
    for layer in layers:
        ids = np.asarray(cfg.load_balancer.initial_global_assignments[layer])
        np.testing.assert_array_equal(ids, placement[layer])
        assert set(ids.tolist()) == set(range(num_experts))
        assert all(len(set(r)) == len(r) for r in ids.reshape(ep, -1).tolist())

    rep = report(stats, ep_size=ep, placement=path)
    total = counts.sum(0)
    default = np.tile(default_placement(num_slots, num_experts, ep), (len(layers), 1))
    placed = np.stack([placement[l] for l in layers])
    want_default = _numpy_report(total, default, ep)
    want_placed = _numpy_report(total, placed, ep)
    got = np.array([[r.mean, r.std, r.rank_imbalance, r.slot_imbalance] for r in rep.layers])
    np.testing.assert_allclose(got, want_default, rtol=1e-9)
    got_placed = np.array([[r.placed_std, r.placed_rank_imbalance, r.placed_slot_imbalance] for r in rep.layers])
    np.testing.assert_allclose(got_placed, want_placed[:, 1:], rtol=1e-9)
    # TensorRT-LLM's --per_expert table: mean and std over the slots instead of the ranks.
    slots_rep = report(stats, ep_size=ep, placement=path, per_expert=True)
    got = np.array([[r.mean, r.std, r.placed_std] for r in slots_rep.layers])
    np.testing.assert_allclose(got, np.c_[_numpy_report(total, default, ep, per_expert=True)[:, :2],
                                          _numpy_report(total, placed, ep, per_expert=True)[:, 1]], rtol=1e-9)
    assert rep.rank_load.shape == (3, ep) and rep.placed_rank_load.shape == (3, ep)
    np.testing.assert_allclose(rep.rank_load.sum(1), total.sum((0, 2)))
    # The balancer works on the summed load: it can only lower that imbalance.
    summed = lambda m: (m.max(1) - m.mean(1)) / m.mean(1)  # noqa: E731
    assert np.all(summed(rep.placed_rank_load) <= summed(rep.rank_load) + 1e-9)
    assert rep.average().placed_rank_imbalance < rep.average().rank_imbalance

    # Without a placement: one slot per expert; a dict placement gives the same projection.
    plain = report(stats)
    assert plain.ep_size == 4 and plain.num_slots == num_experts and plain.placed_rank_load is None
    np.testing.assert_allclose([r.rank_imbalance for r in plain.layers],
                               _numpy_report(total, np.tile(np.arange(num_experts), (3, 1)), 4)[:, 2])
    as_dict = report(stats, ep_size=ep, placement=placement)
    assert [r.placed_rank_imbalance for r in as_dict.layers] == [r.placed_rank_imbalance for r in rep.layers]
    table = format_report(rep)
    assert table.splitlines()[0].split()[:3] == ["layer", "mean", "std"] and "avg" in table


def test_generate_and_report_errors(tmp_path, rng):
    stats = load_stats(write_trtllm_stats(tmp_path, zipf_counts(rng, 2, 2, 1, 16), iters=[0, 1], layers=[0]))
    with pytest.raises(ValueError, match="num_slots=20: allowed: a multiple of ep_size = 8"):
        generate_placement(stats, ep_size=8, num_slots=20)
    with pytest.raises(ValueError, match="num_slots=8"):
        generate_placement(stats, ep_size=4, num_slots=8)
    with pytest.raises(ValueError, match="ep_size=3"):
        report(stats, ep_size=3)
    bad = {0: np.zeros(16, np.int32)}  # expert 0 everywhere: the others are not covered
    with pytest.raises(ValueError, match="initial_global_assignments"):
        report(stats, placement=bad)
    # Keyed by layers the statistics do not hold (numbered differently): not the default silently.
    with pytest.raises(ValueError, match=r"placement: layers \[5\] hold none of the statistics' layers \[0\]"):
        report(stats, placement={5: rng.permutation(16).astype(np.int32)})


def test_report_refuses_a_placement_that_leaves_out_a_layer(tmp_path, rng):
    """The runtime refuses a placement without some MoE layer, so the report does not
    project one with the default placement on that layer."""
    stats = load_stats(write_trtllm_stats(tmp_path, zipf_counts(rng, 2, 2, 3, 16), iters=[0, 1], layers=[3, 4, 5]))
    placement = generate_placement(stats, ep_size=4, num_slots=24)
    assert report(stats, ep_size=4, placement=placement).placed_rank_load.shape == (3, 4)
    del placement[4]
    with pytest.raises(ValueError, match=re.escape(
            "placement: the statistics' layers [4] have no placement (it has layers [3, 5], the statistics have "
            "layers [3..5]); allowed: a placement for every layer of the statistics and no other layer (every MoE "
            "layer of the model)")):
        report(stats, ep_size=4, placement=placement)
    path = write_placement_file(tmp_path / "lb.yaml", placement, 24)
    with pytest.raises(ValueError, match=re.escape(f"placement {str(path)!r}: the statistics' layers [4] have no "
                                                   "placement")):
        report(stats, ep_size=4, placement=path)


def test_report_refuses_a_placement_with_a_layer_not_in_the_statistics(tmp_path, rng, capsys):
    """As the runtime refuses placement layers that are no MoE layers of the model."""
    layers = sorted(rng.choice(10, 2, replace=False).tolist())
    stray = int(rng.integers(10, 60))
    stats_dir = write_trtllm_stats(tmp_path / "s", zipf_counts(rng, 2, 2, 2, 16), iters=[0, 1], layers=layers)
    stats = load_stats(stats_dir)
    placement = dict(generate_placement(stats, ep_size=4, num_slots=24))
    placement[stray] = placement[layers[0]]
    want = (f"layers [{stray}] are not in the statistics (it has layers [{layers[0]}, {layers[1]}, {stray}], the "
            f"statistics have layers [{layers[0]}, {layers[1]}]); allowed: a placement for every layer of the "
            "statistics and no other layer")
    with pytest.raises(ValueError, match=re.escape(f"placement: {want}")):
        report(stats, ep_size=4, placement=placement)
    path = write_placement_file(tmp_path / "lb.yaml", placement, 24)
    with pytest.raises(ValueError, match=re.escape(f"placement {str(path)!r}: {want}")):
        report(stats, ep_size=4, placement=path)
    assert main(["eplb", "report", "--stats", str(stats_dir), "--ep-size", "4", "--placement", str(path),
                 "--no-heatmap"]) == 2
    assert want in capsys.readouterr().err
    del placement[layers[1]]  # one missing and one stray: both named
    with pytest.raises(ValueError, match=re.escape(
            f"placement: the statistics' layers [{layers[1]}] have no placement and layers [{stray}] are not in "
            "the statistics")):
        report(stats, ep_size=4, placement=placement)


def test_report_projects_a_trtllm_placement_file_with_its_ep_size(tmp_path, rng, capsys):
    """TensorRT-LLM's newer generators write ``ep_size`` into the placement file and its
    report_load_statistics.py projects with it; ``wideep eplb report`` refused the key."""
    import yaml

    stats_dir = write_trtllm_stats(tmp_path / "s", zipf_counts(rng, 4, 3, 2, 16), iters=[0, 1, 2], layers=[1, 3])
    stats = load_stats(stats_dir)
    placement = generate_placement(stats, ep_size=8, num_slots=24)

    def trtllm_file(name, **extra):  # as TensorRT-LLM's save_eplb_config: yaml.dump, sorted keys, inline lists
        text = yaml.dump({"num_slots": 24, "ep_size": 8, "layer_updates_per_iter": 0, **extra,
                          "initial_global_assignments": {l: v.tolist() for l, v in placement.items()}},
                         default_flow_style=None, width=float("inf"))
        (tmp_path / name).write_text(text)
        return tmp_path / name

    path = trtllm_file("trt.yaml")
    want = report(stats, ep_size=8, placement=dict(placement))
    for rep in (report(stats, placement=path), report(stats, ep_size=8, placement=path)):
        assert rep.ep_size == 8 and rep.placed_rank_load.shape == (2, 8)  # the file's 8, not the stats' 4
        np.testing.assert_array_equal(rep.placed_rank_load, want.placed_rank_load)
    with pytest.raises(ValueError, match=re.escape(f"ep_size=4: placement {str(path)!r} was generated for ep_size "
                                                   "8 (its ep_size key); allowed: 8, or no ep_size")):
        report(stats, ep_size=4, placement=path)
    with pytest.raises(ValueError, match=r"ep_size='eight'; allowed: an int >= 1"):
        report(stats, placement=trtllm_file("word.yaml", ep_size="eight"))
    with pytest.raises(ValueError, match=r"num_slots: got 24 \(int\); allowed: a multiple of ep_size = 16 \(in the "
                                         r"placement file .*, ep_size=16 from its ep_size key\)"):
        report(stats, placement=trtllm_file("e16.yaml", ep_size=16))
    assert main(["eplb", "report", "--stats", str(stats_dir), "--placement", str(path), "--no-heatmap"]) == 0
    assert ", EP 8 (default placement: 24 slots" in capsys.readouterr().out
    assert main(["eplb", "report", "--stats", str(stats_dir), "--ep-size", "4", "--placement", str(path),
                 "--no-heatmap"]) == 2
    assert "was generated for ep_size 8" in capsys.readouterr().err
    # Deployed as it is, the runtime refuses the key (as TensorRT-LLM's does) and says what to do.
    with pytest.raises(ConfigError, match=r"unknown key 'ep_size'; .*remove it from a placement file you deploy"):
        load_moe_config({"backend": "WIDEEP", "load_balancer": str(path)}, num_experts=16, ep_size=8)


def test_placement_file_layer_updates_per_iter(tmp_path, rng):
    """TensorRT-LLM's option: N > 0 starts online EPLB from the placement; the file loads
    (with backend WIDEEP, which online balancing needs) and projects like a static one."""
    stats = load_stats(write_trtllm_stats(tmp_path / "s", zipf_counts(rng, 4, 2, 2, 16), iters=[0, 1], layers=[2, 5]))
    placement = generate_placement(stats, ep_size=4, num_slots=24)
    static = write_placement_file(tmp_path / "static.yaml", placement, 24)
    online = write_placement_file(tmp_path / "online.yaml", placement, 24, layer_updates_per_iter=3)
    assert "\nlayer_updates_per_iter: 3\n" in online.read_text()
    lb = load_moe_config({"backend": "WIDEEP", "load_balancer": str(online)}, num_experts=16, ep_size=4).load_balancer
    assert lb.layer_updates_per_iter == 3 and lb.is_online
    placed = lambda path: [r.placed_rank_imbalance for r in report(stats, ep_size=4, placement=path).layers]  # noqa: E731
    assert placed(online) == placed(static)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"layer_updates_per_iter={bad!r}: allowed: an int >= 0"):
            write_placement_file(tmp_path / "bad.yaml", placement, 24, layer_updates_per_iter=bad)
    assert not (tmp_path / "bad.yaml").exists()


def test_placement_file_keeps_num_nodes_for_online_eplb(tmp_path, rng, capsys):
    """num_nodes of generate is written into an online placement file (it was only in a comment,
    so online re-placement from the file ran with num_nodes 1) and loads back."""
    num_nodes, ep = 2, 4
    stats_dir = write_trtllm_stats(tmp_path / "s", zipf_counts(rng, 4, 2, 2, 16), iters=[0, 1], layers=[1, 6])
    stats = load_stats(stats_dir)
    placement = generate_placement(stats, ep_size=ep, num_slots=24, num_nodes=num_nodes)
    assert isinstance(placement, Placements) and placement.num_nodes == num_nodes

    def load(path):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)
            return load_moe_config({"backend": "WIDEEP", "load_balancer": str(path)}, num_experts=16,
                                   ep_size=ep).load_balancer
    online = write_placement_file(tmp_path / "online.yaml", placement, 24, layer_updates_per_iter=1)
    assert "\nnum_nodes: 2\n" in online.read_text()
    lb = load(online)
    assert (lb.num_nodes, lb.layer_updates_per_iter, sorted(lb.initial_global_assignments)) == (num_nodes, 1, [1, 6])
    # Explicit wins; 1 is the default and is not written; static: inert (the loader warns), not written.
    assert load(write_placement_file(tmp_path / "one.yaml", placement, 24, layer_updates_per_iter=1,
                                     num_nodes=1)).num_nodes == 1
    assert "num_nodes" not in (tmp_path / "one.yaml").read_text()
    assert load(write_placement_file(tmp_path / "plain.yaml", dict(placement), 24, layer_updates_per_iter=1,
                                     num_nodes=num_nodes)).num_nodes == num_nodes
    static = write_placement_file(tmp_path / "static.yaml", placement, 24)
    assert "num_nodes" not in static.read_text() and load(static).num_nodes == 1
    with pytest.raises(ValueError, match="num_nodes=0: allowed: an int >= 1"):
        write_placement_file(tmp_path / "bad.yaml", placement, 24, layer_updates_per_iter=1, num_nodes=0)
    # The command line: the file round-trips to the --num-nodes it was generated with.
    out = tmp_path / "cli.yaml"
    assert main(["eplb", "generate", "--stats", str(stats_dir), "--ep-size", str(ep), "--num-slots", "24",
                 "--num-nodes", str(num_nodes), "--layer-updates-per-iter", "1", "-o", str(out)]) == 0
    capsys.readouterr()
    assert load(out).num_nodes == num_nodes


def test_heatmap_path_must_end_in_png(tmp_path, rng, capsys):
    """matplotlib writes '<path>.png' for a path without a suffix (and picks the format from
    any other): the path printed and returned must be the file written."""
    matrix = rng.random((2, 3))
    for name, got in (("noext", "no suffix"), ("h.pdf", "suffix '.pdf'"), ("h.png.bak", "suffix '.bak'")):
        with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path / name)!r}: {got}; allowed: a file path "
                                                       "ending in '.png'")):
            save_heatmap(tmp_path / name, matrix, "t")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match=r"dir\.png' is a folder; allowed: a file path ending in '\.png'"):
        save_heatmap(tmp_path / "dir.png", matrix, "t")
    stats_dir = write_trtllm_stats(tmp_path / "s", zipf_counts(rng, 2, 2, 2, 8), iters=[0, 1], layers=[0, 1])
    heat = tmp_path / "heat"
    assert main(["eplb", "report", "--stats", str(stats_dir), "--heatmap", str(heat)]) == 2
    assert f"heatmap path {str(heat)!r}: no suffix" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "s"]  # nothing written
    if HAVE_MPL:
        assert save_heatmap(tmp_path / "H.PNG", matrix, "t").read_bytes().startswith(b"\x89PNG")


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = save_heatmap(tmp_path / "sub" / "h.png", np.arange(12.0).reshape(3, 4), "t", row_labels=[3, 4, 5])
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG")


def test_heatmap_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        save_heatmap(tmp_path / "h.png", np.ones((2, 2)), "t")


# -- command line --------------------------------------------------------------------------

def test_cli_generate_and_report(tmp_path, rng, capsys):
    stats_dir = write_trtllm_stats(tmp_path / "stats", zipf_counts(rng, 4, 3, 2, 32), iters=[5, 6, 7], layers=[1, 2])
    out = tmp_path / "lb.yaml"
    assert main(["eplb", "generate", "--stats", str(stats_dir), "--ep-size", "8", "--num-slots", "48",
                 "--iter-start", "6", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 layers, 32 experts in 48 slots over 8 ranks" in text and str(out) in text
    default, placed, per_iter, per_iter_placed = map(float, re.search(
        r"summed over the iterations \(what the placement balances\) default ([\d.]+) -> placed ([\d.]+); "
        r"per iteration, averaged \(`eplb report`'s measure\) ([\d.]+) -> ([\d.]+)", text).groups())
    assert placed < default
    rep = report(load_stats(stats_dir, iter_start=6), ep_size=8, placement=out)
    imb = lambda load: ((load.max(-1) - load.mean(-1)) / load.mean(-1)).mean()  # noqa: E731
    np.testing.assert_allclose([default, placed], [imb(rep.rank_load), imb(rep.placed_rank_load)], atol=5e-4)
    avg = rep.average()
    np.testing.assert_allclose([per_iter, per_iter_placed], [avg.rank_imbalance, avg.placed_rank_imbalance],
                               atol=5e-4)
    assert load_moe_config({"load_balancer": str(out)}, num_experts=32, ep_size=8).load_balancer.num_slots == 48

    heat = tmp_path / "heat.png"
    assert main(["eplb", "report", "--stats", str(stats_dir), "--ep-size", "8", "--placement", str(out)]
                + (["--heatmap", str(heat)] if HAVE_MPL else ["--no-heatmap"])) == 0
    text = capsys.readouterr().out
    assert "rank imb (placed)" in text and re.search(r"^\s+2\s+\d", text, re.M) and "avg" in text
    assert main(["eplb", "report", "--stats", str(stats_dir)]) == 0  # default heatmap path
    captured = capsys.readouterr()
    assert "EP 4" in captured.out
    if HAVE_MPL:
        assert heat.stat().st_size > 0 and (tmp_path / "heat_placed.png").stat().st_size > 0
        assert (stats_dir / "eplb_report.png").stat().st_size > 0
    else:  # the default heatmap is optional: a note, exit code 0
        assert "pip install matplotlib" in captured.err


def test_cli_eplb_errors(tmp_path, rng, capsys):
    assert main(["eplb", "report", "--stats", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    counts = zipf_counts(rng, 2, 3, 1, 16)
    gap = write_trtllm_stats(tmp_path / "gap", counts, iters=[1, 2, 5], layers=[0])
    assert main(["eplb", "generate", "--stats", str(gap), "-o", str(tmp_path / "x.yaml")]) == 2
    assert "iteration 3 missing" in capsys.readouterr().err
    ok = write_trtllm_stats(tmp_path / "ok", counts, iters=[1, 2, 3], layers=[0])
    assert main(["eplb", "generate", "--stats", str(ok), "--ep-size", "8", "--num-slots", "20"]) == 2
    assert "num_slots=20" in capsys.readouterr().err
    assert main(SMALL + ["--stats-dir", str(tmp_path / "b"), "--stats-iters", "9-2"]) == 2
    assert "--stats-iters='9-2'" in capsys.readouterr().err


def test_bench_moe_records_statistics(tmp_path, capsys):
    stats_dir = tmp_path / "bench_stats"
    # --iters 5: iterations 2..4 must be timed ones (B <= --iters).
    assert main(SMALL + ["--iters", "5", "--ep", "4", "--skew", "zipf:1.5", "--layer-idx", "3",
                         "--stats-dir", str(stats_dir), "--stats-iters", "2-5"]) == 0
    assert "expert statistics: layer 3, iterations 2..4" in capsys.readouterr().out
    stats = load_stats(stats_dir)
    assert (stats.ep_size, stats.iters, stats.layers, stats.top_k) == (4, [2, 3, 4], [3], 4)
    # 16 tokens per rank x top-4, every (token, k) pair counted once on its source rank.
    assert stats.per_rank.sum(-1).tolist() == [[[64]] * 3] * 4
    assert main(["eplb", "generate", "--stats", str(stats_dir), "--num-slots", "24",
                 "-o", str(tmp_path / "lb.yaml")]) == 0
    assert "1 layers, 16 experts in 24 slots over 4 ranks" in capsys.readouterr().out


def test_generate_takes_the_better_of_its_placement_and_the_shared_rank_greedy(tmp_path, rng):
    """compute_placement keeps an expert's replicas on distinct ranks; TensorRT-LLM's greedy
    may stack two on one rank, which balances some layers better (the reviewer's sweep:
    ours worse on 11-38 % of layers at 16 experts / 20 slots / EP4, by up to 8x in
    imbalance). generate_placement takes, per layer, whichever busiest rank is lighter; the
    file loads and runs like any other. With node groups only ours (the greedy knows none)."""
    from wideep_jax.eplb.algorithm import compute_placement
    from wideep_jax.eplb.offline import _busiest, shared_rank_greedy

    num_experts, num_slots, ep, layers = 16, 20, 4, list(range(1, 41))
    heavy = (rng.pareto(1.2, size=(1, 2, len(layers), num_experts)) * 200).astype(np.int64) + 1
    stats = load_stats(write_trtllm_stats(tmp_path / "stats", heavy, iters=[0, 1], layers=layers))
    placement = generate_placement(stats, ep_size=ep, num_slots=num_slots)
    load = stats.load().astype(np.float64)
    ours = np.asarray(compute_placement(load.astype(np.float32), num_slots, ep))
    stacked = 0
    for i, layer in enumerate(layers):
        greedy = shared_rank_greedy(load[i], num_slots, ep)
        assert sorted(set(greedy.tolist())) == list(range(num_experts))
        got = _busiest(load[i], placement[layer], ep)
        assert got <= min(_busiest(load[i], ours[i], ep), _busiest(load[i], greedy, ep)) * (1 + 1e-9)
        stacked += any(len(set(r)) < len(r) for r in placement[layer].reshape(ep, -1).tolist())
    assert stacked > 0  # the greedy won somewhere (18 of 100 such layers in the sweep)
    path = write_placement_file(tmp_path / "lb.yaml", placement, num_slots)
    cfg = load_moe_config({"backend": "WIDEEP", "load_balancer": str(path)}, num_experts=num_experts, ep_size=ep)
    assert sorted(cfg.load_balancer.initial_global_assignments) == layers
    nodes = generate_placement(stats, ep_size=ep, num_slots=num_slots, num_nodes=2)
    assert all(len(set(r)) == len(r) for layer in layers for r in nodes[layer].reshape(ep, -1).tolist())
    # No load at all: the extra slots spread over the experts evenly.
    assert np.bincount(shared_rank_greedy(np.zeros(4), 8, 2), minlength=4).tolist() == [2, 2, 2, 2]
