"""Wide EP across processes (hosts) on CPU: jax.distributed with gloo collectives.

The EP group of a real deployment spans hosts, one process each. Here two
processes with four emulated CPU devices each form one EP8 group. Checked:
the layer and the online balancer in every re-sharding mode
(tests/multiprocess_child.py), and the main job, whose tokens must equal a
one-process run of the same EP8 program.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from process_helpers import ROOT, child_env, free_port, run_processes, run_processes_to_end
from wideep_jax import cli

CHECKPOINT = ROOT / "tests" / "fixtures" / "qwen3_moe_tiny"


def _env() -> dict[str, str]:
    return child_env(JAX_PLATFORMS="cpu")


def _run_processes(commands: list[list[str]], timeout: float = 600) -> list[str]:
    return run_processes(commands, [_env()] * len(commands), timeout=timeout)


def test_layer_and_online_eplb_across_two_processes(tmp_path, rng):
    port, seed = free_port(), int(rng.integers(2**31))
    child = str(ROOT / "tests" / "multiprocess_child.py")
    outs = _run_processes([[sys.executable, child, str(pid), "2", str(port), str(tmp_path), str(seed), "cpu"]
                           for pid in range(2)])
    for pid, out in enumerate(outs):
        assert f"OK <{pid}>" in out, out[-3000:]
    # Process 0 alone wrote the statistics: one file per EP rank of the group.
    assert sorted(f.name for f in (tmp_path / "stats").iterdir()) == (
        ["meta_info.json"] + [f"rank{r}.safetensors" for r in range(8)])


def _report(out: str) -> list[str]:
    """The main job's result lines: per-layer balance and the generated tokens."""
    return [line for line in out.splitlines() if re.match(r"  (layer \d+:|\[\d+\])", line)]


def _package_copy(where: Path) -> str:
    """The package (wideep_jax, pallas_kernels, ffi/csrc) copied under ``where``: another
    host's install path."""
    for name in ("wideep_jax", "pallas_kernels", "ffi/csrc"):
        shutil.copytree(ROOT / name, where / name, ignore=shutil.ignore_patterns("__pycache__"))
    return str(where)


def test_main_job_across_two_processes_matches_one_process(tmp_path):
    """Same tokens and balance report, and (EXPERT_STATISTIC_*) the same per-rank
    statistics files, written by process 0 alone. Process 1 imports the package from
    another path, as another host may: the programs' source locations then differed,
    and the processes waited on each other for ever in their first collective."""
    from safetensors.numpy import load_file

    port = free_port()
    # -P: the package comes from PYTHONPATH, not from the working directory.
    run = [sys.executable, "-P", "-m", "wideep_jax.cli", "run", "--max-new-tokens", "4", "--batch", "4"]
    stats = {name: _env() | {"EXPERT_STATISTIC_ITER_RANGE": "1-3", "EXPERT_STATISTIC_PATH": str(tmp_path / name)}
             for name in ("two", "one")}
    elsewhere = stats["two"] | {"PYTHONPATH": os.pathsep.join([_package_copy(tmp_path / "host1"),
                                                               stats["two"]["PYTHONPATH"]])}
    probe = subprocess.run([sys.executable, "-P", "-c", "import wideep_jax; print(wideep_jax.__file__)"],
                           env=elsewhere, cwd=ROOT, capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(tmp_path / "host1")), probe.stdout
    outs = run_processes([run + ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
                                 "--num-processes", "2", "--process-id", str(pid)] for pid in range(2)]
                         + [run + ["--cpu-devices", "8"]], [stats["two"], elsewhere, stats["one"]],
                         timeout=600)
    two, quiet, one = outs
    assert "on 8 cpu devices, WIDEEP" in two and "online EPLB" in two, two[-2000:]
    assert len(_report(one)) == 3 + 4, one[-2000:]  # 3 MoE layers, 4 prompts
    assert _report(two) == _report(one)
    assert _report(quiet) == [] and "wideep run:" not in quiet  # process 0 reports, the others stay quiet
    files = sorted(f.name for f in (tmp_path / "one").iterdir())
    assert files == ["meta_info.json"] + [f"rank{r}.safetensors" for r in range(8)]
    assert sorted(f.name for f in (tmp_path / "two").iterdir()) == files
    for name in files[1:]:
        got, want = load_file(str(tmp_path / "two" / name)), load_file(str(tmp_path / "one" / name))
        assert sorted(want) == [f"{i}_{layer}" for i in (1, 2) for layer in (1, 2, 3)]  # iterations 1, 2
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    total = sum(load_file(str(tmp_path / "one" / n))["1_1"].sum() for n in files[1:])
    assert total == 4 * 4  # one decode step: 4 sequences, top-4 pairs each


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2"], "allowed only with --coordinator HOST:PORT"),
    (["--coordinator", "auto", "--process-id", "0"], "allowed only with --coordinator HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2"], "needs --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id=2: allowed: 0..1"),
    (["--local-device-ids", "0,1"], r"--local-device-ids=0,1: allowed only with --coordinator"),
    (["--coordinator", "auto", "--local-device-ids", "0,0"], r"'0,0': allowed: distinct device ids >= 0"),
    (["--coordinator", "auto", "--local-device-ids", "0,-1"], r"'0,-1': allowed: distinct device ids >= 0"),
    (["--coordinator", "auto", "--local-device-ids", "0,00"], r"'0,00': allowed: distinct device ids >= 0"),
])
def test_main_job_distributed_flag_errors(argv, message, capsys):
    try:
        code = cli.main(["run", "--max-new-tokens", "1", *argv])
    except SystemExit as exit_:  # argparse's own errors (a flag's value)
        code = exit_.code
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("coordinator, num_processes, process_id", [("auto", None, None), ("host:1234", 2, 1)])
def test_local_device_ids_reach_jax_distributed(monkeypatch, coordinator, num_processes, process_id):
    import jax

    from wideep_jax.run import init_distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # keep this process's collectives
    init_distributed(coordinator, num_processes, process_id, [0, 1, 2, 3])
    (args, kwargs), = calls
    assert kwargs["local_device_ids"] == [0, 1, 2, 3]
    if coordinator != "auto":
        assert args == (coordinator,) and (kwargs["num_processes"], kwargs["process_id"]) == (2, 1)


def test_main_job_coordinator_auto_outside_a_cluster():
    """A fresh process (jax.distributed must start before any backend) with no cluster
    variables: one line naming the flag, exit 2, no hang."""
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MPI_"))}
    proc = subprocess.run([sys.executable, "-m", "wideep_jax.cli", "run", "--coordinator", "auto"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "wideep: error: --coordinator=auto: jax.distributed found no cluster to read" in proc.stderr


def _slurm_job_id() -> int:
    """A SLURM job id whose coordinator port (jax: 61440 + id % 4096) is free now."""
    for _ in range(50):
        port = free_port()
        if port >= 61440:
            return port - 61440
    for port in range(61440, 65536):  # the OS handed out low ports: look in jax's range
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
            return port - 61440
        except OSError:
            continue
    pytest.skip("no free port in jax's SLURM range 61440-65535")


def test_main_job_coordinator_auto_under_slurm():
    """--coordinator auto inside a SLURM step (its variables, as srun sets them for two
    tasks on one node): jax.distributed reads the coordinator, process count and ids,
    and the two processes form one EP8 group, process 0 reporting."""
    job = _slurm_job_id()
    run = [sys.executable, "-m", "wideep_jax.cli", "run", "--max-new-tokens", "2", "--batch", "2",
           "--cpu-devices", "4", "--coordinator", "auto", "--local-device-ids", "0,1,2,3"]
    envs = [_env() | {"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                      "SLURM_PROCID": str(pid), "SLURM_LOCALID": str(pid), "SLURM_STEP_NUM_NODES": "1"}
            for pid in range(2)]
    first, second = run_processes([run, run], envs, timeout=600)
    assert "on 8 cpu devices, WIDEEP" in first, first[-2000:]
    assert len(_report(first)) == 3 + 2  # 3 MoE layers, 2 prompts
    assert _report(second) == [] and "wideep run:" not in second


@pytest.mark.parametrize("case", ["statistics_on_one_process", "prompts_differ", "placements_differ",
                                  "checkpoints_differ", "sources_differ", "writer_folder_bad"])
def test_main_job_processes_that_disagree_fail_alike(tmp_path, case):
    """A setting that differs between the processes (EXPERT_STATISTIC_ITER_RANGE adds
    collectives to every step: they hung for ever; another prompt mixed rows silently),
    or a check only the writer makes (its statistics folder): every process exits 2 with
    the same one-line error, before the model is built."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = [sys.executable, "-m", "wideep_jax.cli", "run", "--max-new-tokens", "2", "--cpu-devices", "2",
           "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id"]
    stats = {"EXPERT_STATISTIC_ITER_RANGE": "0-2", "EXPERT_STATISTIC_PATH": str(tmp_path / "stats")}
    if case == "statistics_on_one_process":
        argvs, envs = [[], []], [_env() | stats, _env()]
        message = ("EXPERT_STATISTIC_ITER_RANGE differs between the processes of this run: process 0: 0-2, "
                   "process 1: unset; allowed: the same on every process")
    elif case == "prompts_differ":
        argvs, envs = [["--prompt", "1,2,3"], ["--prompt", "1,2,4"]], [_env()] * 2
        message = r"the prompts \(--prompt, or --batch, --prompt-len and --seed\) differs between the processes"
    elif case == "placements_differ":  # each host's copy of "the" placement file
        argvs, envs = [], [_env()] * 2
        for pid in range(2):
            rows = {layer: [(e + pid) % 32 for e in range(32)] for layer in (1, 2, 3)}
            (tmp_path / f"cfg{pid}.yaml").write_text(
                f"backend: WIDEEP\nload_balancer:\n  initial_global_assignments: {rows}\n")
            argvs.append(["--moe-config", str(tmp_path / f"cfg{pid}.yaml")])
        message = r"--moe-config differs between the processes of this run: process 0: moe_config digest \w+, "
    elif case == "sources_differ":  # one host has another version of the code (one comment more)
        copy = Path(_package_copy(tmp_path / "host1"))
        with open(copy / "wideep_jax" / "layer.py", "a") as f:
            f.write("# another version\n")
        run[1:1] = ["-P"]  # the package comes from PYTHONPATH, not from the working directory
        argvs = [[], []]
        envs = [_env(), _env() | {"PYTHONPATH": os.pathsep.join([str(copy), _env()["PYTHONPATH"]])}]
        message = (r"the package's sources \(wideep_jax, pallas_kernels; ffi/csrc for the nccl and nvlink "
                   r"backends\) differs between the processes of this run: process 0: digest \w+, process 1: "
                   r"digest \w+;")
    elif case == "checkpoints_differ":  # each host's copy: another model of the same architecture
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file
        argvs, envs = [], [_env()] * 2
        for pid in range(2):
            folder = tmp_path / f"ckpt{pid}"
            shutil.copytree(CHECKPOINT, folder)
            if pid:  # fine-tuned: every weight differs, names, shapes and file sizes do not
                path = str(folder / "model.safetensors")
                with safe_open(path, "np") as f:
                    metadata = f.metadata()
                weights = load_file(path)
                save_file({k: (v * 1.5).astype(v.dtype) for k, v in weights.items()}, path, metadata=metadata)
            argvs.append(["--model", str(folder)])
        assert (tmp_path / "ckpt0" / "model.safetensors").stat().st_size == (
            tmp_path / "ckpt1" / "model.safetensors").stat().st_size
        message = (r"--model's checkpoint files differs between the processes of this run: process 0: 1 "
                   r"\.safetensors files, names, sizes and sampled contents digest \w+, process 1: ")
    else:  # process 0 alone writes, so it alone checks the folder
        bad = stats | {"EXPERT_STATISTIC_PATH": str(blocker / "stats")}
        argvs, envs = [[], []], [_env() | bad] * 2
        message = "EXPERT_STATISTIC_PATH=.*: cannot create that folder"
    results = run_processes_to_end([run + [str(pid)] + argv for pid, argv in enumerate(argvs)], envs, timeout=300)
    for pid, (code, out, err, seconds) in enumerate(results):
        assert code == 2, f"process {pid}: exit {code} after {seconds:.0f} s\n{out[-1500:]}\n{err[-3000:]}"
        assert re.search(message, err), err[-3000:]
        assert "wideep run:" not in out  # nothing was built
    if case == "writer_folder_bad":
        assert "process 0 failed checking the run's arguments: EXPERT_STATISTIC_PATH=" in results[1][2]


def test_agree_raises_alike_on_every_process():
    """processes.agree between two processes: equal settings pass; a differing setting, or
    an error on one process (a ValueError, or a bug's KeyError), raises on both, marked as
    raised alike and naming the setting / process; a step one process skipped times out on
    the other without marking, and the next step reads no record of it."""
    port = free_port()
    child = str(ROOT / "tests" / "agree_child.py")
    results = run_processes_to_end([[sys.executable, child, str(pid), str(port)] for pid in range(2)],
                                   [_env()] * 2, timeout=120)
    lines = {}
    for pid, (code, out, err, _) in enumerate(results):
        assert code == 0, f"process {pid}: exit {code}\n{out}\n{err[-3000:]}"
        for line in out.splitlines():
            who, step, rest = line.split(" ", 2)
            lines[int(who), step] = rest
    for pid in range(2):
        assert lines[pid, "same"] == "ok"
        assert lines[pid, "differ"] == ("DisagreementError True a differs between the processes of this run: "
                                        "process 0: 0, process 1: 1; allowed: the same on every process (each "
                                        "runs the same program over the whole EP group)")
        assert lines[pid, "after"] == "ok", lines
    assert lines[1, "fail"] == "ValueError True bad value on one"
    assert lines[0, "fail"] == "DisagreementError True process 1 failed fail: bad value on one"
    assert lines[0, "bug"] == "KeyError True 'k'"
    assert lines[1, "bug"] == "DisagreementError True process 0 failed bug: KeyError: 'k'"
    assert lines[0, "skipped"].startswith("DisagreementError False process 1 did not finish skipped within 2 s")
    assert (1, "skipped") not in lines
