"""The ``wideep`` command line.

``wideep run`` is the main job: generation with a model (a built-in tiny preset
by default, or a Hugging Face checkpoint) with wide EP and online EPLB, then
prefill / decode tokens/s and per-layer balance; see :mod:`wideep_jax.run`.

``wideep bench-moe`` runs the MoE layer forward and prints tokens/s and the
per-rank load. With no arguments: a DeepSeek-V3-shaped layer scaled down to
run on 8 emulated CPU devices in well under a minute.

``wideep eplb generate`` / ``wideep eplb report``: offline load balancing from
expert statistics files (TensorRT-LLM's format), see :mod:`wideep_jax.eplb.offline`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback


def int_at_least(minimum: int):
    """An argparse ``type`` for ints >= ``minimum``; its error names the value and the rule."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed: an int >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed: an int >= {minimum}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)


def _add_bench_moe(sub) -> None:
    p = sub.add_parser("bench-moe", help="time the MoE layer forward",
                       description="Time the MoE layer forward (random weights, synthetic or router routing).")
    p.add_argument("--hidden", type=POSITIVE, default=512, help="hidden size (DeepSeek-V3: 7168)")
    p.add_argument("--intermediate", type=POSITIVE, default=256, help="per-expert width (DeepSeek-V3: 2048)")
    p.add_argument("--experts", type=POSITIVE, default=64, help="routed experts (DeepSeek-V3: 256)")
    p.add_argument("--top-k", type=POSITIVE, default=8, help="experts per token")
    p.add_argument("--n-group", type=POSITIVE, default=None, help="expert groups for noaux_tc routing (default 8)")
    p.add_argument("--topk-group", type=POSITIVE, default=None, help="groups kept per token (noaux_tc, default 4)")
    p.add_argument("--router", choices=["noaux_tc", "softmax", "llama4"], default="noaux_tc",
                   help="llama4: sigmoid of the top-k logits, the weight applied to the expert's input")
    p.add_argument("--shared-experts", type=NON_NEGATIVE, default=1)
    p.add_argument("--ep", type=POSITIVE, default=None, help="EP size (default: all devices)")
    p.add_argument("--tokens", type=POSITIVE, default=512, help="tokens per rank")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--skew", default="uniform",
                   help="routing: 'uniform', 'zipf:S' (Zipf exponent S over experts) or 'router' (the layer's router)")
    from wideep_jax.config import ALLTOALL_BACKENDS

    # Case-insensitive, as the config's keys are.
    p.add_argument("--backend", type=str.upper, choices=["WIDEEP", "CUTLASS"], default=None,
                   help="overrides the config's backend (without --config: WIDEEP)")
    p.add_argument("--alltoall", type=str.lower, choices=ALLTOALL_BACKENDS, default=None,
                   help="communication backend (overrides the config's alltoall_backend)")
    p.add_argument("--config", default=None, help="moe_config YAML (TensorRT-LLM schema)")
    p.add_argument("--layer-idx", type=NON_NEGATIVE, default=None,
                   help="the layer whose initial_global_assignments row to use (default: the placement's only "
                        "layer; required when it has several)")
    p.add_argument("--iters", type=POSITIVE, default=5)
    p.add_argument("--cpu-devices", type=POSITIVE, default=None,
                   help=f"emulated CPU devices when there is no GPU (default {DEFAULT_CPU_DEVICES})")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--stats-dir", default=None,
                   help="write expert statistics (TensorRT-LLM's format) of the layer to this directory")
    p.add_argument("--stats-iters", default=None, metavar="A-B",
                   help="iterations A..B-1 to record with --stats-dir (default 0-ITERS); every "
                        "iteration runs the same batch, so each holds that batch's counts")
    p.set_defaults(func=_bench_moe)


def _bench_moe(args) -> int:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from wideep_jax.bench import bench_moe_layer, imbalance, parse_skew
    from wideep_jax.comm import resolve_alltoall_backend
    from wideep_jax.config import MoEConfig
    from wideep_jax.routing import RouterSpec
    from wideep_jax.spec import MoESpec

    skew = parse_skew(args.skew)
    stats_iters = recorder = None
    if args.stats_dir is not None:  # checked now (the folder, its older statistics), not after the run
        from wideep_jax.eplb.stats_files import StatsRecorder, parse_iter_range
        stats_iters = parse_iter_range(args.stats_iters or f"0-{args.iters}", name="--stats-iters")
        recorder = StatsRecorder(args.stats_dir, *stats_iters, num_experts=args.experts, top_k=args.top_k)
        check_output_dir("--stats-dir", args.stats_dir)
    elif args.stats_iters is not None:
        raise ValueError(f"--stats-iters={args.stats_iters!r}: allowed: only with --stats-dir")
    if args.router != "noaux_tc" and (args.n_group, args.topk_group) != (None, None):
        raise ValueError(f"--n-group={args.n_group}, --topk-group={args.topk_group}: allowed only with "
                         f"--router noaux_tc (got --router {args.router})")
    platform = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if platform == "gpu" else "float32"))
    ep = jax.device_count() if args.ep is None else args.ep
    if not 1 <= ep <= jax.device_count():
        raise ValueError(f"--ep={ep}: allowed: 1..{jax.device_count()} ({platform} devices)")
    try:
        router = {"noaux_tc": lambda: RouterSpec(kind="noaux_tc", n_group=args.n_group or 8,
                                                 topk_group=args.topk_group or 4, routed_scaling_factor=2.5),
                  "softmax": lambda: RouterSpec(kind="softmax"),
                  "llama4": lambda: RouterSpec(kind="llama4", norm_topk_prob=False)}[args.router]()
        spec = MoESpec(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_experts=args.experts, top_k=args.top_k, router=router,
                       num_shared_experts=args.shared_experts, dtype=dtype, param_dtype=dtype,
                       apply_router_weight_on_input=args.router == "llama4")
    except ValueError as err:  # RouterSpec / MoESpec name their fields: say which flags set them
        grouped = (f" --n-group {args.n_group or '8 (default)'} --topk-group {args.topk_group or '4 (default)'}"
                   if args.router == "noaux_tc" else "")
        raise ValueError(f"--experts {args.experts} --top-k {args.top_k} --router {args.router}{grouped}: {err}") from None
    config = load_config_file("--config", args.config) if args.config else MoEConfig(backend="WIDEEP")
    overrides = {}
    if args.backend is not None:
        overrides["backend"] = args.backend
    if args.alltoall is not None:
        overrides["alltoall_backend"] = args.alltoall
    try:
        config = dataclasses.replace(config, **overrides)
    except ValueError as err:  # e.g. --backend CUTLASS over an online --config
        flags = " ".join(f"--{'backend' if k == 'backend' else 'alltoall'} {v}" for k, v in overrides.items())
        raise ValueError(f"{flags} over --config {args.config}: {err}") from None
    check_kernel_dtype(config, dtype, config_flag="--config", dtype_flag="--dtype", dtype_given=args.dtype)
    mesh = jax.make_mesh((ep,), (config.ep_axis,), devices=jax.devices()[:ep])
    config.validate(num_experts=spec.num_experts, ep_size=ep)
    placed = sorted((config.load_balancer and config.load_balancer.initial_global_assignments) or {})
    layer_idx = _placed_layer(placed, args.layer_idx)
    if args.layer_idx is not None and not placed and args.stats_dir is None:
        raise ValueError(f"--layer-idx={args.layer_idx}: allowed only with a --config placement "
                         "(initial_global_assignments) or --stats-dir (the layer the statistics name)")
    if config.load_balancer is not None and config.load_balancer.is_online:
        print("  note: bench-moe times the initial placement; online balancing (layer_updates_per_iter) "
              "is not run here")

    result = bench_moe_layer(spec, config, mesh, tokens_per_rank=args.tokens, skew=skew,
                             iters=args.iters, seed=args.seed, layer_idx=layer_idx)
    slots = config.num_slots(spec.num_experts)
    comm = (f"{resolve_alltoall_backend(config.alltoall_backend, mesh, config.ep_axis)} all-to-all"
            if config.backend == "WIDEEP" else "all-gather + reduce-scatter")
    print(f"wideep bench-moe: {config.backend} ({comm}), EP {ep} on "
          f"{ep} {platform} devices, {args.tokens} tokens/rank ({result.num_tokens} total)")
    print(f"  layer: hidden {spec.hidden_size}, {spec.num_experts} experts x {spec.intermediate_size} "
          f"({slots} slots), top-{spec.top_k}, {spec.num_shared_experts} shared, {dtype.name}, "
          f"router {router.kind}, skew {args.skew}")
    print("  placement: " + (f"initial_global_assignments[{layer_idx}]" if placed else "the default"))
    print(f"  compile + first run: {result.compile_seconds:.2f} s")
    print(f"  forward: {result.median_ms:.3f} ms (median of {args.iters}) -> "
          f"{result.tokens_per_second:,.0f} tokens/s")
    received = [int(v) for v in result.stats.rank_tokens]
    rows = [int(v) for v in result.rank_rows()]
    label = "received tokens" if config.backend == "WIDEEP" else "computed tokens"
    print(f"  per-rank {label}: {received}  (max-mean)/mean {imbalance(received):.3f}")
    print(f"  per-rank expert rows:     {rows}  (max-mean)/mean {imbalance(rows):.3f}")
    if recorder is not None:
        layer = layer_idx or 0
        # The timed loop reruns one batch, so its stats (already returned, no extra host
        # sync in the timed region) are every iteration's stats.
        for iteration in range(*stats_iters):
            recorder.record(iteration, layer, result.stats)
        recorder.step(stats_iters[1])  # saves, as a run reaching iter_stop does
        print(f"  expert statistics: layer {layer}, iterations {stats_iters[0]}..{stats_iters[1] - 1} "
              f"-> {args.stats_dir}/ (meta_info.json, rank0..{ep - 1}.safetensors)")
    return 0


def _placed_layer(given: list[int], layer_idx: int | None) -> int | None:
    """The layer of ``initial_global_assignments`` (whose layers are ``given``) the
    benchmark places its slots by: ``--layer-idx``, else the placement's only layer (the
    default placement would silently ignore the file's)."""
    from wideep_jax.config import _layer_list

    if layer_idx is not None or not given:
        return layer_idx
    if len(given) == 1:
        return given[0]
    raise ValueError(f"--layer-idx: required, the config's initial_global_assignments place layers "
                     f"{_layer_list(given)}; allowed: one of them")


def _add_stats_path(p) -> None:
    """``--stats`` (TensorRT-LLM: ``--expert_statistic_path``), default ``$EXPERT_STATISTIC_PATH``."""
    from wideep_jax.eplb.stats_files import ENV_PATH

    # The variable step 1 wrote to, so step 2 needs no path; unset (or empty), the flag is required.
    env = os.environ.get(ENV_PATH) or None
    default = f"${ENV_PATH} = {env!r}" if env else f"${ENV_PATH}; required when it is unset"
    p.add_argument("--stats", "--expert_statistic_path", dest="stats", default=env, required=env is None,
                   help=f"statistics directory (default: {default})")


def _add_eplb(sub) -> None:
    # Each flag also takes the spelling of TensorRT-LLM's generate_eplb_config.py /
    # report_load_statistics.py (second option string), so their users' scripts run unchanged.
    p = sub.add_parser("eplb", help="offline expert load balancing (TensorRT-LLM's workflow)",
                       description="Offline EPLB: placement files and load reports from expert "
                                   "statistics (meta_info.json + rank<r>.safetensors).")
    eplb = p.add_subparsers(dest="eplb_command", required=True)
    g = eplb.add_parser("generate", help="write a balanced placement file from statistics",
                        description="Balance the load summed over the iterations; write "
                                    "TensorRT-LLM's moe_load_balancer.yaml.")
    _add_stats_path(g)
    g.add_argument("--ep-size", "--ep_size", dest="ep_size", type=POSITIVE, default=None,
                   help="EP size to balance for (default: the stats' ranks)")
    g.add_argument("--num-slots", "--num_slots", dest="num_slots", type=POSITIVE, default=None,
                   help="total expert slots (default: num_experts)")
    g.add_argument("--num-nodes", type=POSITIVE, default=1, help="keep each expert's replicas within one of N nodes")
    g.add_argument("--iter-start", "--iter_start", dest="iter_start", type=NON_NEGATIVE, default=None,
                   help="first iteration used (default: the first recorded)")
    g.add_argument("--iter-stop", "--iter_stop", dest="iter_stop", type=NON_NEGATIVE, default=None,
                   help="iteration after the last one used")
    g.add_argument("--layer-updates-per-iter", "--layer_updates_per_iter", dest="layer_updates_per_iter",
                   type=NON_NEGATIVE, default=0,
                   help="written into the file: 0 = static placement, N > 0 = online EPLB re-placing "
                        "N layers per iteration, starting from this placement")
    g.add_argument("-o", "--output", "--output_path", dest="output", default="moe_load_balancer.yaml",
                   help="placement file to write (replaced if it exists; default: %(default)s)")
    g.set_defaults(func=_eplb_generate)
    r = eplb.add_parser("report", help="per-layer load statistics and a per-rank heatmap",
                        description="Per-layer load statistics under the default placement and, "
                                    "with --placement, projected under a placement file.")
    _add_stats_path(r)
    r.add_argument("--ep-size", "--ep_size", dest="ep_size", type=POSITIVE, default=None,
                   help="EP size (default: the stats' ranks)")
    r.add_argument("--placement", "--projection_eplb_config_path", dest="placement", default=None,
                   help="placement file to project the load onto")
    r.add_argument("--iter-start", "--iter_start", dest="iter_start", type=NON_NEGATIVE, default=None)
    r.add_argument("--iter-stop", "--iter_stop", dest="iter_stop", type=NON_NEGATIVE, default=None)
    r.add_argument("--per-expert", "--per_expert", dest="per_expert", action="store_true",
                   help="mean and std over the slots (experts, without --placement) instead of the ranks")
    r.add_argument("--heatmap", default=None, help="PNG of per-rank loads (default: STATS/eplb_report.png)")
    r.add_argument("--no-heatmap", action="store_true", help="print the table only")
    r.set_defaults(func=_eplb_report)


def _load_stats(args):
    """``load_stats`` of ``--stats``; its errors name the flag and, where they do not, what is allowed."""
    from wideep_jax.eplb.stats_files import StatsFileError, load_stats

    try:
        return load_stats(args.stats, iter_start=args.iter_start, iter_stop=args.iter_stop)
    except StatsFileError as err:
        hint = "" if "allowed" in str(err) else (
            "; allowed: a statistics directory (meta_info.json + rank<r>.safetensors, as a run with "
            "EXPERT_STATISTIC_ITER_RANGE writes)")
        raise ValueError(f"--stats={args.stats!r}: {err}{hint}") from None


def _eplb_generate(args) -> int:
    from wideep_jax.eplb.offline import generate_placement, report, write_placement_file

    _check_output_file("-o", args.output)  # before the placement is computed, not after
    stats = _load_stats(args)
    ep = stats.ep_size if args.ep_size is None else args.ep_size
    slots = stats.num_experts if args.num_slots is None else args.num_slots
    try:
        placements = generate_placement(stats, ep_size=ep, num_slots=slots, num_nodes=args.num_nodes)
    except ValueError as err:
        if args.ep_size is not None or "ep_size" not in str(err):
            raise
        # The statistics hold no EP size: say where this one came from and how to give one.
        raise ValueError(f"{err}; ep_size {ep} is the number of rank files in {args.stats!r}, used as no "
                         "--ep-size was given: pass --ep-size N") from None
    comment = (f"Generated by `wideep eplb generate` from {args.stats} (iterations "
               f"{stats.iter_start}..{stats.iter_stop - 1}), ep_size {ep}, num_nodes {args.num_nodes}.")
    path = write_placement_file(args.output, placements, slots, comment=comment,
                                layer_updates_per_iter=args.layer_updates_per_iter)
    rep = report(stats, ep_size=ep, placement=path)
    avg, (summed, placed_summed) = rep.average(), rep.summed_rank_imbalance()
    mode = (f"online, {args.layer_updates_per_iter} layer(s) per iteration" if args.layer_updates_per_iter
            else "static")
    print(f"wideep eplb generate: {len(placements)} layers, {stats.num_experts} experts in {slots} "
          f"slots over {ep} ranks ({mode}) -> {path}")
    # The placement balances the summed load; per iteration (the report's measure) a few
    # tokens per step are noisy and can read worse than the default.
    print(f"  rank imbalance (max-mean)/mean, mean over layers: of the load summed over the iterations "
          f"(what the placement balances) default {summed:.3f} -> placed {placed_summed:.3f}; per iteration, "
          f"averaged (`eplb report`'s measure) {avg.rank_imbalance:.3f} -> {avg.placed_rank_imbalance:.3f}")
    return 0


def _eplb_report(args) -> int:
    from pathlib import Path

    from wideep_jax.eplb.offline import check_png_path, format_report, normalised, report, save_heatmap

    if args.heatmap and not args.no_heatmap:
        check_png_path(args.heatmap)  # before the report is printed, not after
    stats = _load_stats(args)
    rep = report(stats, ep_size=args.ep_size, placement=args.placement, per_expert=args.per_expert)
    print(f"wideep eplb report: {args.stats}, iterations {stats.iter_start}..{stats.iter_stop - 1}, "
          f"{stats.num_experts} experts, top-{stats.top_k}, {len(stats.layers)} layers, EP {rep.ep_size} "
          f"(default placement: {rep.num_slots} slots"
          + (f"; placement {args.placement}: {rep.placement_num_slots} slots)" if args.placement else ")"))
    if args.placement and rep.ep_size_from_stats:
        # TensorRT-LLM's report needs the file's ep_size key; a placement made for another EP
        # size whose slot count the rank files divide would be projected wrongly, silently.
        print(f"  EP {rep.ep_size}: the statistics' rank files (the placement file names no ep_size); pass "
              "--ep-size N if the placement was made for another EP size")
    print(f"  mean, std: of the load per {'slot' if args.per_expert else 'rank'}; imb = (max-mean)/mean; each "
          "per iteration, averaged over the iterations (imb: those with load)")
    print(format_report(rep))
    if args.no_heatmap:
        return 0
    png = Path(args.heatmap) if args.heatmap else Path(args.stats) / "eplb_report.png"
    maps = [(png, rep.rank_load, "default placement")]
    if rep.placed_rank_load is not None:
        maps.append((png.with_name(f"{png.stem}_placed{png.suffix}"), rep.placed_rank_load,
                     f"placement {Path(args.placement).name}"))
    try:
        for path, load, what in maps:
            save_heatmap(path, normalised(load), f"per-rank load / mean, {what}", row_labels=stats.layers)
            print(f"  heatmap: {path}")
    except ImportError as err:
        if args.heatmap:  # asked for explicitly: an error; by default just a note
            raise ValueError(str(err)) from None
        print(f"  no heatmap: {err}", file=sys.stderr)
    return 0


def _add_build_ffi(sub) -> None:
    p = sub.add_parser("build-ffi", help="build the NCCL / NVLink all-to-all library (nvcc) into the cache",
                       description="Builds ffi/csrc into $WIDEEP_CACHE_DIR (default ~/.cache/wideep_jax), "
                                   "keyed by source hash, jaxlib and NCCL versions and GPU arch; prints its path.")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    p.add_argument("--archs", default=None, help="comma-separated GPU archs, e.g. 90,100 (default: visible GPUs)")
    p.add_argument("--verbose", action="store_true", help="print the nvcc command")
    p.set_defaults(func=_build_ffi)


def _build_ffi(args) -> int:
    from wideep_jax.comm import ffi_build

    if args.archs is not None:
        archs = [a.strip() for a in args.archs.split(",")]
        if not all(a.replace(".", "").isdigit() for a in archs):
            raise ValueError(f"--archs={args.archs!r}: allowed: comma-separated GPU archs, e.g. 90 or 90,100")
        os.environ["WIDEEP_CUDA_ARCHS"] = ",".join(archs)
    try:
        path = ffi_build.build_library(force=args.force, verbose=args.verbose)
    except ffi_build.FfiBuildError as err:
        print(f"wideep: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wideep`` console script."""
    parser = argparse.ArgumentParser(prog="wideep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from wideep_jax import run
    run.add_parser(sub)
    _add_bench_moe(sub)
    _add_eplb(sub)
    _add_build_ffi(sub)
    args = parser.parse_args(argv)
    try:
        return _run_command(args)
    except Exception as err:
        from wideep_jax.processes import exit_now, in_multiprocess_run, raised_alike

        if not in_multiprocess_run() or raised_alike(err):
            raise
        traceback.print_exc()  # a bug's traceback; then see exit_now
        exit_now(1)


def _run_command(args) -> int:
    try:
        # Emulated CPU devices must be requested before the first backend is created;
        # the flag only affects the CPU platform, so it is harmless on a GPU machine.
        _request_cpu_devices(getattr(args, "cpu_devices", None))
        return args.func(args)
    except BrokenPipeError as err:
        # The reader went away (``wideep ... | head``): stop quietly, as a shell tool does,
        # with stdout pointed at /dev/null so the interpreter's exit flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _error_exit(1, err)
    except (ValueError, OSError) as err:  # config, argument and path errors: one line, no traceback
        print(f"wideep: error: {err}", file=sys.stderr)
        return _error_exit(2, err)
    except Exception as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"wideep: error: out of memory: {str(err).splitlines()[0][:300]}; allowed: fewer tokens "
              "(--tokens, --batch, --prompt-len, --max-new-tokens), more devices, or a smaller model", file=sys.stderr)
        return _error_exit(2, err)


def _error_exit(code: int, error: Exception) -> int:
    """``code``. A process of a multi-process run whose error the others may not share
    ends here (see processes.exit_now); one raised alike on every process returns."""
    from wideep_jax.processes import exit_now, in_multiprocess_run, raised_alike

    if in_multiprocess_run() and not raised_alike(error):
        exit_now(code)
    return code


DEFAULT_CPU_DEVICES = 8
MAX_CPU_DEVICES = 1024  # XLA creates each emulated device up front: far more takes minutes


def _request_cpu_devices(requested: int | None) -> None:
    """Asks XLA for ``--cpu-devices`` emulated CPU devices (default 8) before the first
    backend is created; the flag only affects the CPU platform, so it is harmless on a GPU
    machine. An ``XLA_FLAGS`` count that disagrees with ``--cpu-devices`` is an error."""
    if requested is not None and not 1 <= requested <= MAX_CPU_DEVICES:
        raise ValueError(f"--cpu-devices={requested}: allowed: 1..{MAX_CPU_DEVICES}")
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(r"--xla_force_host_platform_device_count=(\S+)", flags)
    if found is None:
        count = DEFAULT_CPU_DEVICES if requested is None else requested
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    elif requested is not None and found.group(1) != str(requested):
        raise ValueError(f"--cpu-devices={requested}: XLA_FLAGS already sets "
                         f"--xla_force_host_platform_device_count={found.group(1)}; allowed: the same count, "
                         "or leave one of them out")


def check_output_dir(flag: str, path) -> None:
    """Creates the output folder now, so a path under a file fails before the run, not after it."""
    from pathlib import Path

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag}={str(path)!r}: cannot create that folder ({err.strerror}); allowed: a folder "
                         "path that exists or can be created") from None


def _check_output_file(flag: str, path) -> None:
    """An output file's path: not a folder, and its folder exists or can be created."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag}={str(path)!r} is a folder; allowed: a file path (e.g. {str(path / 'lb.yaml')!r})")
    # Checked, not created yet: a run that fails later leaves no empty folder behind.
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag}={str(path)!r}: cannot create its folder {str(path.parent)!r} ({str(existing)!r} "
                         "is a file); allowed: a file path whose folder exists or can be created")


def check_kernel_dtype(config, dtype, *, config_flag: str, dtype_flag: str, dtype_given) -> None:
    """The Pallas expert kernels take 16-bit operands only: an ``expert_kernel`` naming one
    with float32 weights is refused now, before a model is built or loaded, not at its first call."""
    import jax.numpy as jnp

    from wideep_jax.moe import expert_kernel_takes_dtype

    if not expert_kernel_takes_dtype(config.expert_kernel, dtype):
        default = "" if dtype_given else " (the default on this platform)"
        raise ValueError(f"{config_flag}: moe_config.expert_kernel={config.expert_kernel!r} takes bfloat16 or "
                         f"float16 weights, got {dtype_flag} {jnp.dtype(dtype).name}{default}; allowed: "
                         f"{dtype_flag} bfloat16, or expert_kernel auto or xla")


def load_config_file(flag: str, path, **kwargs):
    """`load_moe_config` of a command-line file; its errors name the flag."""
    from wideep_jax.config import load_moe_config

    return load_moe_config(path, name=flag, **kwargs)

if __name__ == "__main__":
    sys.exit(main())
