"""``wideep run``: the main job. Builds or loads a model, generates, reports speed and balance.

With no arguments it runs the built-in ``tiny`` preset (a Qwen3-MoE-shaped model
with random weights) with wide EP over every device (8 emulated CPU devices on a
machine without a GPU) and online EPLB. ``--model PATH`` runs a Hugging Face
checkpoint folder instead.

With ``EXPERT_STATISTIC_ITER_RANGE=A-B`` set (and optionally ``EXPERT_STATISTIC_PATH``),
the per-rank expert counts of generation iterations ``A..B-1`` (iteration 0 is the
prefill, then one per decode step) are written in TensorRT-LLM's format, for
``wideep eplb generate`` (offline EPLB, step 1).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

PRESETS = {
    "tiny": dict(model_type="qwen3_moe", vocab_size=512, hidden_size=256, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=512,
                 moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4, moe_layers=(1, 2, 3),
                 qk_norm=True),
}
"""Built-in model shapes (random weights); layer 0 is dense as in DeepSeek-V3."""


def add_parser(sub) -> None:
    from wideep_jax.cli import NON_NEGATIVE, POSITIVE

    p = sub.add_parser("run", help="generate with a model (the main job)",
                       description=__doc__.splitlines()[0],
                       epilog="environment: EXPERT_STATISTIC_ITER_RANGE=A-B (and EXPERT_STATISTIC_PATH=DIR, "
                              "default expert_statistic) writes the per-rank expert counts of iterations "
                              "A..B-1 (0 = the prefill, then one per decode step) for `wideep eplb generate`")
    p.add_argument("--model", default="tiny", help=f"checkpoint folder or preset ({', '.join(PRESETS)})")
    p.add_argument("--moe-config", default=None,
                   help="moe_config YAML (default: WIDEEP, at least EP extra slots (a multiple of EP in all), "
                        "online EPLB)")
    p.add_argument("--ep", type=POSITIVE, default=None, help="EP size (default: all devices)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt: comma-separated token ids, or text when the checkpoint has a "
                        "tokenizer (repeatable); default: random prompts")
    p.add_argument("--batch", type=POSITIVE, default=None,
                   help="random prompts when --prompt is not given (default 8)")
    p.add_argument("--prompt-len", type=POSITIVE, default=None, help="length of the random prompts (default 32)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, with --temperature > 0 (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cpu-devices", type=POSITIVE, default=None,
                   help="emulated CPU devices (per process) when there is no GPU (default 8)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="join a multi-process run (one process per host; the EP group spans them): "
                        "process 0's address, or 'auto' to read it from the cluster (SLURM, Open MPI, ...)")
    p.add_argument("--num-processes", type=POSITIVE, default=None, help="with --coordinator HOST:PORT")
    p.add_argument("--process-id", type=NON_NEGATIVE, default=None, help="with --coordinator HOST:PORT")
    p.add_argument("--local-device-ids", type=_device_ids, default=None, metavar="I,J,...",
                   help="with --coordinator: this process's GPUs (default: all; under SLURM, JAX's default "
                        "is the one GPU at SLURM_LOCALID, so a task per node needs e.g. 0,1,2,3,4,5,6,7)")
    p.set_defaults(func=main_job)


def _device_ids(text: str) -> list[int]:
    """``--local-device-ids``: distinct non-negative ints, comma-separated."""
    import argparse

    parts = [t.strip() for t in text.split(",")]
    ids = [int(t) for t in parts] if all(t.isdigit() for t in parts) else None
    if ids is None or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: distinct device ids >= 0, comma-separated, e.g. 0,1,2,3")
    return ids


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                     local_device_ids: list[int] | None = None) -> None:
    """Joins a multi-process run (``jax.distributed``) before any device is touched."""
    if local_device_ids is not None and coordinator is None:
        raise ValueError(f"--local-device-ids={','.join(map(str, local_device_ids))}: allowed only with "
                         "--coordinator (a multi-process run)")
    explicit = (num_processes, process_id)
    if coordinator is None or coordinator == "auto":
        if explicit != (None, None):
            raise ValueError(f"--num-processes={num_processes}, --process-id={process_id}: allowed only "
                             "with --coordinator HOST:PORT")
        if coordinator is None:
            return
    elif None in explicit:
        raise ValueError(f"--coordinator={coordinator!r} needs --num-processes and --process-id; got "
                         f"{num_processes} and {process_id}")
    elif process_id >= num_processes:
        raise ValueError(f"--process-id={process_id}: allowed: 0..{num_processes - 1} (--num-processes)")
    import jax
    # CPU devices of different processes talk through gloo (the default has no
    # cross-process collectives); GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Programs whose HLO differs only in source locations (the package imported from another
    # path on another host, a wrapper's frame) never met in their CPU collectives: a hang,
    # measured with gloo. No locations in the HLO, so every process compiles the same bytes.
    jax.config.update("jax_traceback_in_locations_limit", 0)
    # jax.distributed waits for every process (up to its 300 s initialization timeout): say so.
    who = ("the cluster's coordinator" if coordinator == "auto"
           else f"{coordinator} as process {process_id} of {num_processes}")
    print(f"wideep: joining the multi-process run at {who}; waiting for the others (jax.distributed)",
          file=sys.stderr, flush=True)
    try:
        if coordinator == "auto":
            jax.distributed.initialize(local_device_ids=local_device_ids)
        else:
            jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                       local_device_ids=local_device_ids)
    except ValueError as err:  # auto outside a cluster
        raise ValueError(f"--coordinator={coordinator}: jax.distributed found no cluster to read ({err}); allowed: "
                         "a launch under SLURM, Open MPI, ..., or --coordinator HOST:PORT with "
                         "--num-processes and --process-id") from None
    except RuntimeError as err:  # e.g. a backend already started in this process
        raise ValueError(f"--coordinator={coordinator}: {err}") from None
    from wideep_jax.processes import mark_joined
    mark_joined()


def _moe_config(path, num_experts: int, ep: int):
    from wideep_jax.cli import load_config_file
    from wideep_jax.config import load_moe_config

    if path is not None:
        return load_config_file("--moe-config", path, num_experts=num_experts, ep_size=ep)
    if ep == 1:
        # One rank holds every expert: there is nothing to balance, and a replica would sit
        # beside its own expert (online placement allows one copy of an expert per rank).
        return load_moe_config({"backend": "WIDEEP"}, num_experts=num_experts, ep_size=1)
    # At least EP extra slots for replicas, rounded up to a multiple of EP (every rank holds as many).
    num_slots = -(-(num_experts + ep) // ep) * ep
    return load_moe_config({"backend": "WIDEEP", "load_balancer": {"num_slots": num_slots,
                                                                   "layer_updates_per_iter": 1}},
                           num_experts=num_experts, ep_size=ep)


def _stats_recorder(cfg, max_new_tokens: int):
    """A StatsRecorder when ``EXPERT_STATISTIC_ITER_RANGE`` is set, else None."""
    import jax

    from wideep_jax.cli import check_output_dir
    from wideep_jax.eplb.stats_files import ENV_PATH, ENV_RANGE, StatsRecorder

    recorder = StatsRecorder.from_env(cfg.num_experts, cfg.num_experts_per_tok)
    if recorder is None:
        return None
    span = f"{ENV_RANGE}={os.environ[ENV_RANGE]!r}"
    if not cfg.moe_layers:
        raise ValueError(f"{span}: this model has no MoE layers to record; allowed: unset {ENV_RANGE}")
    # A range that starts after the last iteration would record nothing: fail before the
    # run rather than after it, so no compute is spent on a step 1 that yields no files.
    if recorder.iter_start >= max_new_tokens:
        raise ValueError(f"{span}: this run has iterations 0..{max_new_tokens - 1} (the prefill, then "
                         f"one per decode step, --max-new-tokens={max_new_tokens}); allowed: a range "
                         f"starting at most {max_new_tokens - 1}, or a larger --max-new-tokens")
    if jax.process_index() == 0:  # the writer: a bad folder fails now, not after the run
        check_output_dir(ENV_PATH, recorder.path)
    return recorder


def _record_step(recorder, moe_layers):
    """generate's ``after_step`` that records each iteration's per-layer stats."""
    layer_ids = [layer.layer_idx for layer in moe_layers]
    iteration = [0]

    def after_step(stats) -> None:
        if len(stats) != len(layer_ids):  # zip would silently mislabel or drop layers
            raise ValueError(f"got stats of {len(stats)} MoE layers; allowed: {len(layer_ids)} ({layer_ids})")
        # TensorRT-LLM saves at the first iteration past the range; here the files are
        # written after the run (_save_stats): a save waits for the device, and mid-decode
        # it would land in the decode timing. Recording keeps device arrays: no sync.
        if recorder.should_record(iteration[0]):
            for layer_idx, layer_stats in zip(layer_ids, stats):
                recorder.record(iteration[0], layer_idx, layer_stats)
        iteration[0] += 1
    return after_step


def _keep_slot_rows(steps: list):
    """generate's ``after_step`` that keeps each step's per-layer slot row counts (device
    arrays, read after the run: no op and no sync per step)."""
    def after_step(stats) -> None:
        steps.append([s.slot_counts for s in stats])
    return after_step


def _measured_imbalance(steps: list, ep: int):
    """``(per step, over the run, steps with load)`` from each step's slot row counts.

    A step's rows ran under the placement of that step (slot ``s`` is on rank
    ``s // (S / ep)`` whatever expert it holds), so online re-placement needs no
    bookkeeping. Per step: (max - mean) / mean of the rows per rank, averaged over the
    steps with load (TensorRT-LLM's report convention); over the run: of the summed rows.
    """
    import jax
    import numpy as np

    from wideep_jax.eplb.algorithm import imbalance

    rows = np.asarray(jax.device_get(steps), np.float64)  # [steps, layers, slots]
    ranks = rows.reshape(*rows.shape[:2], ep, -1).sum(-1)  # [steps, layers, ep]
    loaded = ranks.sum(-1) > 0  # steps after every sequence ended compute nothing
    per_step = np.asarray(imbalance(ranks), np.float64)  # 0 on those steps: left out of the mean
    mean = (per_step * loaded).sum(0) / np.maximum(loaded.sum(0), 1)
    return mean, np.asarray(imbalance(ranks.sum(0)), np.float64), int(loaded.any(1).sum())


def _save_stats(recorder, say, ran: int) -> str | None:
    """Writes the recorded iterations (process 0 only, see StatsRecorder.save); says which.
    ``ran``: the iterations the run had. Returns the error to raise after the report when
    the run (every sequence at EOS) ended before the range started: nothing to write."""
    from wideep_jax.eplb.stats_files import ENV_PATH, ENV_RANGE

    if not recorder.iterations:
        return (f"{ENV_RANGE}={os.environ.get(ENV_RANGE)!r}: the run ended after iteration {ran - 1} (every "
                f"sequence reached EOS) before the range started at {recorder.iter_start}: nothing was recorded "
                f"and no statistics were written to {ENV_PATH}={str(recorder.path)!r}; allowed: a range starting "
                f"at most {ran - 1}, or prompts that decode longer")
    first, last = recorder.iterations[0], recorder.iterations[-1]
    path = recorder.save()
    # A run shorter than the range still writes what it saw; the line says it fell short.
    short = "" if last == recorder.iter_stop - 1 else (
        f" only: the run ended there ({ENV_RANGE} asked for {recorder.iter_start}..{recorder.iter_stop - 1})")
    say(f"  expert statistics: iterations {first}..{last}{short} -> {path}/ "
        f"(meta_info.json, rank0..{recorder.num_ranks - 1}.safetensors)")


def _tokenizer(folder: Path | None):
    if folder is None or not (folder / "tokenizer.json").exists():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _prompts(args, vocab: int, tokenizer) -> list[list[int]]:
    import numpy as np

    if not args.prompt:
        rng = np.random.default_rng(args.seed)
        return [list(map(int, rng.integers(0, vocab, args.prompt_len or 32))) for _ in range(args.batch or 8)]
    prompts = []
    for text in args.prompt:
        parts = [p.strip() for p in text.split(",")]
        if all(re.fullmatch(r"-?[0-9]+", p) for p in parts):  # not str.isdigit: it takes '²', which int() refuses
            ids = [int(p) for p in parts]
        elif tokenizer is not None:
            ids = tokenizer.encode(text).ids
        else:
            raise ValueError(f"--prompt={text!r}: allowed: comma-separated token ids "
                             "(no tokenizer.json with the model, or the `tokenizers` package is missing: pip install -e .[text])")
        if not ids or not all(0 <= i < vocab for i in ids):
            raise ValueError(f"--prompt={text!r}: allowed: 1 or more token ids in [0, {vocab})")
        prompts.append(ids)
    return prompts


def _set_up(args) -> SimpleNamespace:
    """The run's model config, moe_config, recorder and prompts, from its arguments:
    every check that needs no model, before the (possibly long) build."""
    import jax
    import jax.numpy as jnp

    from wideep_jax.cli import check_kernel_dtype
    from wideep_jax.models import DecoderConfig, from_hf_config
    from wideep_jax.models.generate import check_sampling
    from wideep_jax.models.loading import read_config

    platform = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if platform == "gpu" else "float32"))
    ep = jax.device_count() if args.ep is None else args.ep
    if not 1 <= ep <= jax.device_count():
        raise ValueError(f"--ep={ep}: allowed: 1..{jax.device_count()} ({platform} devices)")
    if jax.process_count() > 1 and ep != jax.device_count():
        raise ValueError(f"--ep={ep}: allowed in a {jax.process_count()}-process run: {jax.device_count()} "
                         "(the EP group spans every process's devices)")
    folder = None if args.model in PRESETS else Path(args.model)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"--model={args.model!r}: allowed: a checkpoint folder or a preset ({', '.join(PRESETS)})")
    if folder is None:
        cfg = DecoderConfig(**PRESETS[args.model], dtype=dtype)
    else:
        cfg = from_hf_config(read_config(folder), dtype=dtype)
    # A placement file for another model, or one with a layer left out, fails here, before
    # the model is built (the layers would refuse it one by one, after building the ones before).
    moe_config = _moe_config(args.moe_config, cfg.num_experts, ep).check_layers(
        cfg.moe_layers, num_layers=cfg.num_hidden_layers)
    check_kernel_dtype(moe_config, dtype, config_flag="--moe-config", dtype_flag="--dtype", dtype_given=args.dtype)
    recorder = _stats_recorder(cfg, args.max_new_tokens)
    # Argument errors that need no model: said before the (possibly long) build.
    try:
        check_sampling(args.temperature, 1.0 if args.top_p is None else args.top_p)
    except ValueError as err:
        raise ValueError(f"--{err}".replace("top_p=", "top-p=", 1)) from None
    # A flag that cannot apply is an error, not silently ignored.
    if args.prompt:
        for flag, value in (("--batch", args.batch), ("--prompt-len", args.prompt_len)):
            if value is not None:
                raise ValueError(f"{flag}={value}: allowed only without --prompt (it sizes the random prompts)")
    if args.top_p is not None and args.temperature == 0:
        raise ValueError(f"--top-p={args.top_p!r}: allowed only with --temperature > 0 (temperature 0 decodes "
                         "greedily)")
    tokenizer = _tokenizer(folder)
    prompts = _prompts(args, cfg.vocab_size, tokenizer)
    mesh = jax.make_mesh((ep,), (moe_config.ep_axis,), devices=jax.devices()[:ep],
                         axis_types=(jax.sharding.AxisType.Auto,))
    alltoall = None
    if moe_config.backend == "WIDEEP":  # resolved per host (WIDEEP_ALLTOALL, the FFI build): compared
        from wideep_jax.comm import resolve_alltoall_backend
        alltoall = resolve_alltoall_backend(moe_config.alltoall_backend, mesh, moe_config.ep_axis)
    return SimpleNamespace(platform=platform, dtype=dtype, ep=ep, folder=folder, cfg=cfg, moe_config=moe_config,
                           recorder=recorder, tokenizer=tokenizer, prompts=prompts, mesh=mesh, alltoall=alltoall,
                           top_p=1.0 if args.top_p is None else args.top_p)


def _settings(args, setup: SimpleNamespace) -> dict[str, str]:
    """What every process of a run must have alike, as short texts (digests of long values;
    file contents, not paths, which may differ between hosts)."""
    from wideep_jax.eplb.stats_files import ENV_RANGE

    def digest(value) -> str:
        return hashlib.sha256(repr(value).encode()).hexdigest()[:12]

    settings = {
        "--model": args.model if setup.folder is None else f"config.json digest {digest(setup.cfg)}",
        "--moe-config": f"moe_config digest {digest(setup.moe_config)}",
        "--dtype": setup.dtype.name, "--ep": str(setup.ep), "--max-new-tokens": str(args.max_new_tokens),
        "--temperature": repr(args.temperature), "--top-p": repr(setup.top_p), "--seed": str(args.seed),
        "the prompts (--prompt, or --batch, --prompt-len and --seed)":
            f"{len(setup.prompts)} prompts, token ids digest {digest(setup.prompts)}",
        # It adds the statistics' collectives to every step: processes without it hang with it.
        ENV_RANGE: os.environ.get(ENV_RANGE, "unset"),
        "the all-to-all backend (moe_config.alltoall_backend, WIDEEP_ALLTOALL)": str(setup.alltoall),
        # Another version of the code or of JAX compiles other programs: they wait on each other.
        "the package's sources (wideep_jax, pallas_kernels; ffi/csrc for the nccl and nvlink backends)":
            f"digest {_sources_digest(with_ffi=setup.alltoall in ('nccl', 'nvlink'))}",
        "jax, jaxlib and flax": _library_versions(),
    }
    if setup.folder is not None:
        from wideep_jax.models.loading import checkpoint_files

        files = checkpoint_files(setup.folder)
        settings["--model's checkpoint files"] = (f"{len(files)} .safetensors files, names, sizes and "
                                                  f"sampled contents digest {_checkpoint_digest(files)}")
    return settings


def _sources_digest(*, with_ffi: bool) -> str:
    """Digest of this package's Python sources and, ``with_ffi``, the FFI library's, by
    path relative to their folder: hosts install the package at different paths."""
    import pallas_kernels
    import wideep_jax
    from wideep_jax.comm import ffi_build

    trees = [(root, sorted(root.rglob("*.py")))
             for root in (Path(wideep_jax.__file__).parent, Path(pallas_kernels.__file__).parent)]
    if with_ffi:
        trees.append((ffi_build.SOURCE_DIR, ffi_build.source_files()))
    h = hashlib.sha256()
    for root, paths in trees:
        for path in paths:
            h.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes())
    return h.hexdigest()[:12]


def _library_versions() -> str:
    import flax
    import jax
    import jaxlib

    return f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}"


_SAMPLES_PER_FILE, _SAMPLE_BYTES = 8, 8192


def _checkpoint_digest(files: list[Path]) -> str:
    """Each file's name, size, safetensors header and 8 windows of 8 KiB spread over its
    tensor data (the first and last included): two checkpoints of one architecture (a base
    and a fine-tuned model) have the same names and sizes, but their weights differ
    everywhere. About 64 KiB read per file, not the whole checkpoint (hundreds of GB)."""
    import json

    from wideep_jax.models.loading import _read_header  # the loader's own check of each file

    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        header, data_start = _read_header(path)
        h.update(f"{path.name}\0{size}\0{json.dumps(header, sort_keys=True)}\0".encode())
        with open(path, "rb") as f:
            span = max(0, size - data_start - _SAMPLE_BYTES)
            for i in range(_SAMPLES_PER_FILE):
                f.seek(data_start + span * i // (_SAMPLES_PER_FILE - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:12]


def main_job(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from wideep_jax.eplb.algorithm import imbalance, rank_loads
    from wideep_jax.layer import MoELayer
    from wideep_jax.models import CausalLM, from_pretrained
    from wideep_jax.models.generate import generate, generated_lengths, model_balancer
    from wideep_jax.processes import agree, mark_raised_alike

    init_distributed(args.coordinator, args.num_processes, args.process_id, args.local_device_ids)
    # Every process runs the same program; process 0 reports. A check that fails on one
    # process, or a setting that differs, fails on every process here, before the build.
    try:
        setup = _set_up(args)
        settings = _settings(args, setup)
    except Exception as err:  # any kind: the others must not wait for this process
        agree("checking the run's arguments", error=err)
        raise
    agree("checking the run's arguments", settings)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    platform, dtype, ep, folder = setup.platform, setup.dtype, setup.ep, setup.folder
    cfg, moe_config, recorder, tokenizer, prompts = (setup.cfg, setup.moe_config, setup.recorder,
                                                     setup.tokenizer, setup.prompts)
    mesh = setup.mesh
    start = time.perf_counter()
    model = (CausalLM(cfg, moe_config, mesh=mesh, rngs=nnx.Rngs(args.seed)) if folder is None
             else from_pretrained(folder, moe_config=moe_config, mesh=mesh, dtype=dtype))
    comm = "" if setup.alltoall is None else f" ({setup.alltoall} all-to-all)"
    say(f"wideep run: {args.model} ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}, {dtype.name}) on {ep} {platform} devices, "
        f"{moe_config.backend}{comm}; built in {time.perf_counter() - start:.1f} s")
    moe_layers = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoELayer)]
    # generate steps the model's online balancer itself (after the prefill and every decode
    # step, before after_step): the same object, asked for here to say so.
    balancer = model_balancer(model)
    if balancer is not None:
        lb = moe_config.load_balancer
        say(f"  online EPLB: {balancer.layers[0].num_slots} slots, {lb.layer_updates_per_iter} layer(s) "
            "re-placed per step")

    def progress(t: int) -> None:
        done = (t + 1) * 30 // args.max_new_tokens
        say(f"\r  decoding [{'#' * done}{'.' * (30 - done)}] {t + 1}/{args.max_new_tokens}",
            end="", file=sys.stderr, flush=True)

    # With a balancer or a recorder the steps return their statistics anyway: the rank loads are
    # then measured under the placement each step ran with. Without, asking for them would cost
    # every step (the statistics' collectives, a re-read of the model): the static placement that
    # ran is projected instead.
    steps = [] if balancer is not None or recorder is not None else None
    hooks = ([_record_step(recorder, moe_layers)] if recorder is not None else []) + (
        [_keep_slot_rows(steps)] if steps is not None else [])

    def after_step(stats) -> None:
        for hook in hooks:
            hook(stats)

    result = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=setup.top_p, seed=args.seed, on_token=progress,
                      after_step=after_step if hooks else None)
    say(file=sys.stderr)
    prompt_tokens = sum(len(p) for p in prompts)
    # Tokens a sequence decoded up to its EOS: after it (and after an early stop) the steps
    # only pad, and counting those would inflate the throughput.
    lengths = generated_lengths(result.tokens, cfg.eos_token_id)
    decode_tokens = int((lengths - 1).sum())
    say(f"  prefill: {prompt_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms -> "
        f"{prompt_tokens / result.prefill_seconds:,.0f} tokens/s")
    if decode_tokens:
        say(f"  decode: {decode_tokens} tokens in {result.decode_seconds * 1e3:.1f} ms -> "
            f"{decode_tokens / result.decode_seconds:,.0f} tokens/s ({len(prompts)} sequences"
            f"{', stopped at EOS' if lengths.max() < args.max_new_tokens else ''})")
    busiest = [f"busiest expert {c.max() / max(c.mean(), 1e-9):.2f}x the mean" for c in result.expert_counts]
    if steps is not None and moe_layers:
        per_step, run, loaded = _measured_imbalance(steps, ep)
        say(f"  rank imbalance (max-mean)/mean of the expert rows each EP rank computed, measured under each "
            f"step's placement: per step (mean of {loaded} steps) and over the run (rows summed)")
        for i, layer in enumerate(moe_layers):
            say(f"  layer {layer.layer_idx}: rank imbalance {per_step[i]:.3f} per step, {run[i]:.3f} over the run; "
                f"{busiest[i]}")
    elif moe_layers:
        say("  rank imbalance (max-mean)/mean over the run, projected: the run's routed pairs on the static "
            "placement that ran (an expert's pairs split evenly over its replicas)")
        for layer, counts, note in zip(moe_layers, result.expert_counts, busiest):
            loads = np.asarray(rank_loads(counts, layer.slot_to_expert[...], layer.ep_size))
            say(f"  layer {layer.layer_idx}: rank imbalance {float(imbalance(loads)):.3f} over the run "
                f"(projected); {note}")
    # steps: one entry per iteration the run had (kept whenever there is a recorder).
    # Process 0 writes; a failure is reported after the tokens, by every process.
    save_failure = stats_error = None
    try:
        stats_error = _save_stats(recorder, say, len(steps)) if recorder is not None else None
    except Exception as err:  # e.g. safetensors' own error type: the others wait in agree below
        save_failure = err
    for row, prompt in enumerate(prompts[:4]):
        new = [int(t) for t in result.tokens[row]]
        text = tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new[:16]))
        say(f"  [{row}] {len(prompt)} prompt tokens -> {text}{' ...' if tokenizer is None and len(new) > 16 else ''}")
    agree("writing the expert statistics", error=save_failure)
    if stats_error is not None:  # after the report: the generation itself ran (alike on every process)
        raise mark_raised_alike(ValueError(stats_error))
    return 0
