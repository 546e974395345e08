"""EPLB review, items left from the earlier one: statistics counts that wrapped or were
skipped silently, negative device counts in the online step, subnormal loads on which the
jitted placement and its NumPy twin disagreed, and a report whose defaulted ep_size was
refused without saying where it came from."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_helpers import make_mesh
from test_eplb_algorithm import _check_valid
from test_eplb_offline import write_trtllm_stats
from test_eplb_online import EP, covering_placement, expert_weights, slot_weights_of
from wideep_jax.cli import main
from wideep_jax.config import ConfigError
from wideep_jax.eplb import algorithm as alg
from wideep_jax.eplb import algorithm_reference as ref
from wideep_jax.eplb.offline import report
from wideep_jax.eplb.online import eplb_update
from wideep_jax.eplb.state import EplbConfig, init_state
from wideep_jax.eplb.stats_files import StatsFileError, StatsRecorder, load_stats


# ---- statistics files -------------------------------------------------------------------

def test_uint64_counts_of_2_63_or_more_are_refused_not_wrapped(tmp_path, rng):
    """uint64 counts >= 2**63 became negative in int64 (2**63 -> -2**63), past the >= 0 check."""
    counts = rng.integers(0, 50, (2, 2, 1, 8)).astype(np.uint64)
    r, a, e = (int(rng.integers(n)) for n in (2, 2, 8))
    counts[r, a, 0, e] = np.uint64(2**63 + int(rng.integers(0, 1000)))
    path = write_trtllm_stats(tmp_path / "big", counts, iters=[3, 4], layers=[5], dtype=np.uint64)
    want = (f"rank{r}.safetensors': key '{3 + a}_5' (iteration {3 + a}, layer 5) has count "
            f"{int(counts[r, a, 0, e])} for expert {e}; allowed: counts < 2**63")
    with pytest.raises(StatsFileError, match=re.escape(want)):
        load_stats(path)
    # The largest int64 is kept exactly; two of them summed over ranks would wrap: refused.
    counts[:, :, 0, e] = 0
    counts[r, a, 0, e] = np.uint64(2**63 - 1)
    exact = load_stats(write_trtllm_stats(tmp_path / "max", counts, iters=[3, 4], layers=[5], dtype=np.uint64))
    assert int(exact.counts[a, 0, e]) == 2**63 - 1 and int(exact.per_rank[r, a, 0, e]) == 2**63 - 1
    counts[1 - r, a, 0, e] = 1
    path = write_trtllm_stats(tmp_path / "sum", counts, iters=[3, 4], layers=[5], dtype=np.uint64)
    with pytest.raises(StatsFileError, match=re.escape(f"layer 5, expert {e}: the counts of iterations [3, 5) over "
                                                       f"all rank files sum to {2**63}; allowed: a sum < 2**63")):
        load_stats(path)


def test_a_directory_named_like_a_rank_file_is_refused(tmp_path, rng, capsys):
    """A directory 'rank1.safetensors' was skipped: rank 1's counts were missing silently
    (with rank2 present it read as a gap; as the last rank, ep_size was one short)."""
    counts = rng.integers(0, 50, (1, 2, 1, 8))
    path = write_trtllm_stats(tmp_path / "s", counts, iters=[0, 1], layers=[0])
    (path / "rank1.safetensors").mkdir()
    want = f"{str(path / 'rank1.safetensors')!r} is not a file (a directory or broken link); allowed:"
    with pytest.raises(StatsFileError, match=re.escape(want)):
        load_stats(path)
    assert main(["eplb", "report", "--stats", str(path), "--no-heatmap"]) == 2
    assert want in capsys.readouterr().err
    (path / "rank1.safetensors").rmdir()
    (path / "rank1.safetensors").symlink_to(tmp_path / "gone.safetensors")  # a broken link too
    with pytest.raises(StatsFileError, match=re.escape(want)):
        load_stats(path)


def test_recorder_refuses_counts_that_int32_files_would_wrap(tmp_path):
    """The files hold int32: 2**32 + 5 was written as 5, silently."""
    rec = StatsRecorder(tmp_path / "rec", 0, 1, num_experts=4, top_k=2)
    rec.record(0, 3, np.array([[1, 2, 3, 4], [2, 2**32 + 5, 0, 1]], np.int64))
    with pytest.raises(ValueError, match=re.escape("counts of iteration 0, layer 3, rank 1 have 4294967301 for "
                                                   "expert 1; allowed: counts < 2**31 (the files hold int32)")):
        rec.save()
    assert not (tmp_path / "rec").exists()
    ok = StatsRecorder(tmp_path / "ok", 0, 1, num_experts=4, top_k=2)
    ok.record(0, 3, np.array([[2**31 - 1, 0, 0, 1]], np.int64))
    ok.save()
    assert int(load_stats(tmp_path / "ok").counts[0, 0, 0]) == 2**31 - 1


# ---- negative counts as device arrays ------------------------------------------------------

def test_negative_device_counts_count_as_zero_in_the_step(rng):
    """NumPy counts with a negative are refused; device counts were accumulated as they were
    (a negative decayed load). They cannot be read back without a host sync, so the step
    counts them as 0, as compute_placement does for negative loads under jit."""
    mesh = make_mesh(EP)
    placement = np.stack([covering_placement(rng, 12, 8, EP) for _ in range(2)])
    # Two groups: at iteration 0 only layer 0 may be re-placed (and its load reset).
    config = EplbConfig(num_layers=2, num_experts=8, num_slots=12, ep_size=EP, reshard="collective")
    masters = expert_weights(rng, 8)
    counts = rng.integers(0, 50, (2, 8)).astype(np.int32)
    counts[1, int(rng.integers(8))] = -int(rng.integers(1, 100))
    with pytest.raises(ValueError, match=f"counts: got a minimum of {counts.min()}; allowed: routed pairs, >= 0"):
        eplb_update(init_state(placement, 8), [slot_weights_of(masters, p, mesh) for p in placement],
                    counts, config=config, mesh=mesh)
    state, _ = eplb_update(init_state(placement, 8), [slot_weights_of(masters, p, mesh) for p in placement],
                           jnp.asarray(counts), config=config, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(state.load[1]), np.maximum(counts[1], 0).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(state.placement[1]), placement[1])
    # compute_placement reads a concrete device array back (it is no sync-free step): refused.
    with pytest.raises(ValueError, match=r"load: got values in \[-1.0, 3.0\]; allowed: finite and >= 0"):
        alg.compute_placement(jnp.array([3, -1, 2, 1], jnp.int32), 4, 2)


# ---- subnormal loads -------------------------------------------------------------------------

_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32


def _tiny_loads(rng, num_layers, num_experts):
    """Loads whose values (or replica shares, or differences of rank loads) are subnormal."""
    rows = []
    for i in range(num_layers):
        kind = i % 4
        if kind == 0:  # subnormal loads, some of them 0
            row = rng.integers(0, 6, num_experts) * 2.0 ** -149
        elif kind == 1:  # normal, in [tiny, 2 tiny): shares and differences are subnormal
            row = (2**23 + rng.integers(0, 40, num_experts)) * 2.0 ** -149
        elif kind == 2:  # normal, a few times tiny
            row = rng.integers(1, 12, num_experts) * _TINY
        else:  # an ordinary layer beside them
            row = rng.integers(0, 100, num_experts).astype(np.float64)
        rows.append(row)
    return np.asarray(rows, np.float32)


@pytest.mark.parametrize("num_experts,num_slots,ep_size,num_nodes", [(8, 32, 8, 1), (8, 16, 4, 2)])
def test_subnormal_loads_give_the_reference_placement(rng, num_experts, num_slots, ep_size, num_nodes):
    """XLA flushes subnormal floats to zero (on CPU: 1e-40 > 0 is False), NumPy does not:
    the two disagreed on such loads and on normal loads whose shares were subnormal. Both
    now count loads below 2**-80 as 0."""
    load = _tiny_loads(rng, 12, num_experts)
    got = np.asarray(alg.compute_placement(load, num_slots, ep_size, num_nodes=num_nodes))
    _check_valid(got, num_experts, num_slots, ep_size)
    np.testing.assert_array_equal(got, ref.compute_placement(load, num_slots, ep_size, num_nodes=num_nodes))
    # The rule itself: such loads place as zeros would.
    small = np.where(load < 2.0 ** -80, 0, load).astype(np.float32)
    np.testing.assert_array_equal(got, np.asarray(alg.compute_placement(small, num_slots, ep_size,
                                                                        num_nodes=num_nodes)))
    current = np.stack([ref.compute_placement(rng.permutation(row), num_slots, ep_size, num_nodes=num_nodes)
                        for row in load])
    got = np.asarray(alg.compute_placement(load, num_slots, ep_size, num_nodes=num_nodes, current=current,
                                           tolerance=0.05))
    np.testing.assert_array_equal(got, ref.compute_placement(load, num_slots, ep_size, num_nodes=num_nodes,
                                                             current=current, tolerance=0.05))


def test_huge_layers_scaled_into_subnormals_give_the_reference_placement():
    """Under jit a layer of huge loads is scaled by 2**-64: its small loads became subnormal."""
    rng = np.random.default_rng(0)  # fixed: only some such layers were placed differently
    load = (rng.integers(0, 200, (32, 8)) * 2.0 ** -66).astype(np.float32)
    load[:, 0] = 1e38
    got = np.asarray(jax.jit(lambda x: alg.compute_placement(x, 16, 8))(load))
    _check_valid(got, 8, 16, 8)
    np.testing.assert_array_equal(got, ref.compute_placement(load, 16, 8))


# ---- report without an ep_size ---------------------------------------------------------------

def test_report_names_where_a_defaulted_ep_size_came_from(tmp_path, rng, capsys):
    """Statistics hold no ep_size: the report takes the number of rank files. 3 ranks over
    8 experts was refused as 'ep_size=3', an argument the user never gave."""
    counts = rng.integers(0, 50, (3, 2, 2, 8))
    path = write_trtllm_stats(tmp_path / "s", counts, iters=[0, 1], layers=[1, 2])
    stats = load_stats(path)
    note = (f"ep_size 3 is the number of rank files in {str(path)!r}, used as no ep_size was given (the "
            "statistics hold none): pass ep_size (`wideep eplb report --ep-size N`)")
    with pytest.raises(ValueError, match=re.escape("ep_size=3: allowed: a divisor of num_slots = 8 (the default "
                                                   "placement has one slot per expert); " + note)):
        report(stats)
    placement = tmp_path / "lb.yaml"
    placement.write_text(json.dumps({"num_slots": 8, "initial_global_assignments":
                                     {1: list(range(8)), 2: list(range(8))[::-1]}}))
    with pytest.raises(ConfigError, match=re.escape(note)):
        report(stats, placement=placement)
    assert main(["eplb", "report", "--stats", str(path), "--no-heatmap"]) == 2
    assert note in capsys.readouterr().err
    # Given, or from the file's ep_size key, it works.
    assert report(stats, ep_size=4).ep_size == 4
    assert report(stats, ep_size=2, placement=placement).ep_size == 2
    placement.write_text(json.dumps({"ep_size": 4, "num_slots": 8, "initial_global_assignments":
                                     {1: list(range(8)), 2: list(range(8))}}))
    assert report(stats, placement=placement).ep_size == 4
    assert main(["eplb", "report", "--stats", str(path), "--no-heatmap", "--ep-size", "2"]) == 0


def test_report_placement_errors_not_about_sizes_get_no_ep_size_note(tmp_path, rng):
    """A missing placement file, or a moe_config file given as the placement, is no
    matter of ep_size: the note on where it came from stays out of those errors."""
    path = write_trtllm_stats(tmp_path / "s", rng.integers(0, 50, (4, 2, 2, 8)), iters=[0, 1], layers=[1, 2])
    config = tmp_path / "config.yaml"
    config.write_text("moe_config:\n  backend: WIDEEP\n")
    for placement, problem in ((tmp_path / "nosuch.yaml", "not found"), (config, "moe_config")):
        with pytest.raises(ConfigError, match=problem) as err:
            report(load_stats(path), placement=placement)
        assert "rank files" not in str(err.value), err.value
    # An expert id past the statistics' experts is a matter of the sizes: the note stays.
    ids = list(range(8, 16))
    placement = tmp_path / "lb.yaml"
    placement.write_text(json.dumps({"num_slots": 8, "initial_global_assignments": {1: ids, 2: ids}}))
    with pytest.raises(ConfigError, match=r"allowed: an expert id in \[0, 8\) .*; ep_size 4 is the number of rank"):
        report(load_stats(path), placement=placement)
    placement.write_text(json.dumps({"ep_size": 2, "num_slots": 8, "initial_global_assignments": {1: ids, 2: ids}}))
    with pytest.raises(ConfigError, match=r"allowed: an expert id in \[0, 8\) \(in the placement file .*, for "
                                          r"num_experts=8, ep_size=2 from its ep_size key\)"):
        report(load_stats(path), placement=placement)


def test_generate_output_path_checked_before_the_placement(tmp_path, rng, capsys):
    """-o naming a folder, or a file under a file: one line naming -o, exit 2 (they were
    raw OS errors after the placement was computed)."""
    path = write_trtllm_stats(tmp_path / "s", rng.integers(0, 50, (4, 2, 2, 8)), iters=[0, 1], layers=[1, 2])
    blocker = tmp_path / "file.yaml"
    blocker.write_text("")
    for output, problem in ((tmp_path, "is a folder; allowed: a file path"),
                            (blocker / "x.yaml", "cannot create its folder")):
        assert main(["eplb", "generate", "--stats", str(path), "-o", str(output)]) == 2
        captured = capsys.readouterr()
        assert f"-o={str(output)!r}" in captured.err and problem in captured.err, captured.err
        assert "wideep eplb generate:" not in captured.out
    assert main(["eplb", "generate", "--stats", str(path), "-o", str(tmp_path / "new" / "lb.yaml")]) == 0


def test_generate_names_where_a_defaulted_ep_size_came_from(tmp_path, rng, capsys):
    """`wideep eplb generate` takes the rank files' count as ep_size too: 3 over 8 slots said
    'a multiple of ep_size = 3' without where the 3 came from or how to give another."""
    path = write_trtllm_stats(tmp_path / "s", rng.integers(0, 50, (3, 2, 2, 8)), iters=[0, 1], layers=[1, 2])
    out = tmp_path / "lb.yaml"
    assert main(["eplb", "generate", "--stats", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "allowed: a multiple of ep_size = 3" in err and "3 is the number of rank files" in err, err
    assert "pass --ep-size N" in err, err
    assert main(["eplb", "generate", "--stats", str(path), "--ep-size", "4", "-o", str(out)]) == 0
