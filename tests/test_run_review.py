"""Review tests of the numbers `wideep run` prints and of the statistics files' readers."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from wideep_jax.cli import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "qwen3_moe_tiny"


def test_decode_clock_stops_before_the_tokens_are_stacked(monkeypatch):
    """decode_seconds (the printed decode tokens/s) times the decode steps only: the stack
    of the tokens afterwards compiles on a first call (the warm-up does not stack) and
    copies to the host, and used to be inside the timed region."""
    import jax.numpy as jnp

    from wideep_jax.models import from_pretrained
    from wideep_jax.models.generate import generate

    model = from_pretrained(FIXTURE, dtype=jnp.float32)
    stack = jnp.stack
    delay = 0.5

    def slow_stack(*args, **kwargs):  # as a first call's compile of the stack
        time.sleep(delay)
        return stack(*args, **kwargs)
    monkeypatch.setattr(jnp, "stack", slow_stack)
    result = generate(model, [[1, 2, 3, 4], [5, 6]], max_new_tokens=3, eos_token_id=None)
    assert result.tokens.shape == (2, 3)
    assert 0 < result.decode_seconds < delay, result.decode_seconds


def test_run_statistics_range_after_every_sequence_stopped(tmp_path, monkeypatch, capsys):
    """A run whose sequences all reach EOS before EXPERT_STATISTIC_ITER_RANGE starts has
    nothing to write: one error line naming the variable and what is allowed, after the
    run's report, instead of an IndexError traceback."""
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = list(range(config["vocab_size"]))  # every token ends its sequence
    (folder / "config.json").write_text(json.dumps(config))
    stats_dir = tmp_path / "stats"
    monkeypatch.setenv("EXPERT_STATISTIC_ITER_RANGE", "2-5")
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", str(stats_dir))
    assert main(["run", "--model", str(folder), "--ep", "2", "--prompt", "1,2,3", "--prompt", "4,5",
                 "--max-new-tokens", "6"]) == 2
    captured = capsys.readouterr()
    assert "prefill: 5 tokens" in captured.out and "[1] 2 prompt tokens ->" in captured.out
    assert "decode:" not in captured.out  # no decode token before EOS: no rate
    assert ("wideep: error: EXPERT_STATISTIC_ITER_RANGE='2-5': the run ended after iteration 0 (every "
            "sequence reached EOS) before the range started at 2") in captured.err
    assert "allowed: a range starting at most 0" in captured.err and "Traceback" not in captured.err
    assert not list(stats_dir.iterdir())  # made empty before the run (a bad path fails early), left so


def _stats_dir(path: Path, files: dict, meta=b'{"num_experts": 4, "num_experts_per_token": 2}') -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "meta_info.json").write_bytes(meta)
    for name, tensors in files.items():
        save_file(tensors, str(path / name))
    return path


def test_stats_readers_name_the_file_and_the_rule(tmp_path):
    """Malformed statistics directories: an error naming the file, the value and what is
    allowed (these were an IndexError, a bare UnicodeDecodeError, and silently one key lost)."""
    from wideep_jax.eplb.stats_files import StatsFileError, load_stats

    counts = {"0_1": np.array([1, 2, 3, 4], np.int32)}
    # rank1 and rank01 are both rank 1: summed as one rank before, or an IndexError.
    both = _stats_dir(tmp_path / "both", {"rank0.safetensors": counts, "rank1.safetensors": counts,
                                          "rank01.safetensors": counts})
    with pytest.raises(StatsFileError, match=r"rank01\.safetensors and rank1\.safetensors are both rank 1; "
                                             r"allowed: one file per EP rank"):
        load_stats(both)
    # Not UTF-8: the message names the file.
    latin = _stats_dir(tmp_path / "latin", {"rank0.safetensors": counts}, meta=b"\xff\xfe{}")
    with pytest.raises(StatsFileError, match=r"meta_info\.json': invalid JSON .*allowed: "):
        load_stats(latin)
    # '0_1' and '00_1' name one (iteration, layer): one would replace the other.
    twice = _stats_dir(tmp_path / "twice", {"rank0.safetensors": {**counts, "00_1": np.zeros(4, np.int32)}})
    with pytest.raises(StatsFileError, match=r"rank0\.safetensors': keys '00_1' and '0_1' both name "
                                             r"iteration 0, layer 1; allowed: one key per"):
        load_stats(twice)


def test_recorder_save_removes_a_second_file_of_a_rank(tmp_path):
    """A recorder overwriting a folder (same meta_info.json) leaves no second file of a rank
    (rank01 beside rank1), which load_stats would refuse."""
    from wideep_jax.eplb.stats_files import StatsRecorder, load_stats

    counts = {"0_1": np.array([1, 2, 3, 4], np.int32)}
    folder = _stats_dir(tmp_path / "stats", {"rank0.safetensors": counts, "rank01.safetensors": counts})
    rec = StatsRecorder(folder, 0, 1, num_experts=4, top_k=2)
    rec.record(0, 1, np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.int32))
    rec.save()
    stats = load_stats(folder)
    assert stats.ep_size == 2 and stats.per_rank[:, 0, 0].tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
