"""The ``wideep`` command line.

``wideep bench-moe`` runs the MoE layer forward and prints tokens/s and the
per-rank load. With no arguments: a DeepSeek-V3-shaped layer scaled down to
run on 8 emulated CPU devices in well under a minute.
"""
from __future__ import annotations

import argparse
import os
import sys


def _add_bench_moe(sub) -> None:
    p = sub.add_parser("bench-moe", help="time the MoE layer forward",
                       description="Time the MoE layer forward (random weights, synthetic or router routing).")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (DeepSeek-V3: 7168)")
    p.add_argument("--intermediate", type=int, default=256, help="per-expert width (DeepSeek-V3: 2048)")
    p.add_argument("--experts", type=int, default=64, help="routed experts (DeepSeek-V3: 256)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token")
    p.add_argument("--n-group", type=int, default=8, help="expert groups for noaux_tc routing")
    p.add_argument("--topk-group", type=int, default=4, help="groups kept per token")
    p.add_argument("--router", choices=["noaux_tc", "softmax"], default="noaux_tc")
    p.add_argument("--shared-experts", type=int, default=1)
    p.add_argument("--ep", type=int, default=None, help="EP size (default: all devices)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--skew", default="uniform",
                   help="routing: 'uniform', 'zipf:S' (Zipf exponent S over experts) or 'router' (the layer's router)")
    p.add_argument("--backend", choices=["WIDEEP", "CUTLASS"], default=None,
                   help="overrides the config's backend (default WIDEEP)")
    p.add_argument("--alltoall", default=None, help="communication backend (overrides the config)")
    p.add_argument("--config", default=None, help="moe_config YAML (TensorRT-LLM schema)")
    p.add_argument("--layer-idx", type=int, default=None, help="layer index for initial_global_assignments")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cpu-devices", type=int, default=8, help="emulated CPU devices when there is no GPU")
    p.add_argument("--seed", type=int, default=0)


def _bench_moe(args) -> int:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from wideep_jax.bench import bench_moe_layer, imbalance, parse_skew
    from wideep_jax.comm import get_alltoall_backend
    from wideep_jax.config import MoEConfig, load_moe_config
    from wideep_jax.routing import RouterSpec
    from wideep_jax.spec import MoESpec

    skew = parse_skew(args.skew)
    platform = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if platform == "gpu" else "float32"))
    ep = args.ep or jax.device_count()
    if ep > jax.device_count():
        raise SystemExit(f"--ep={ep}: allowed: at most the {jax.device_count()} {platform} devices")
    router = (RouterSpec(kind="noaux_tc", n_group=args.n_group, topk_group=args.topk_group,
                         routed_scaling_factor=2.5)
              if args.router == "noaux_tc" else RouterSpec(kind="softmax"))
    spec = MoESpec(hidden_size=args.hidden, intermediate_size=args.intermediate,
                   num_experts=args.experts, top_k=args.top_k, router=router,
                   num_shared_experts=args.shared_experts, dtype=dtype, param_dtype=dtype)
    config = load_moe_config(args.config) if args.config else MoEConfig(backend="WIDEEP")
    overrides = {}
    if args.backend:
        overrides["backend"] = args.backend
    if args.alltoall:
        overrides["alltoall_backend"] = args.alltoall
    config = dataclasses.replace(config, **overrides)
    mesh = jax.make_mesh((ep,), (config.ep_axis,), devices=jax.devices()[:ep])
    config.validate(num_experts=spec.num_experts, ep_size=ep if config.backend == "WIDEEP" else 1)

    result = bench_moe_layer(spec, config, mesh, tokens_per_rank=args.tokens, skew=skew,
                             iters=args.iters, seed=args.seed, layer_idx=args.layer_idx)
    slots = config.num_slots(spec.num_experts)
    comm = get_alltoall_backend(config.alltoall_backend).name if config.backend == "WIDEEP" else "no"
    print(f"wideep bench-moe: {config.backend} ({comm} all-to-all), EP {ep} on "
          f"{ep} {platform} devices, {args.tokens} tokens/rank ({result.num_tokens} total)")
    print(f"  layer: hidden {spec.hidden_size}, {spec.num_experts} experts x {spec.intermediate_size} "
          f"({slots} slots), top-{spec.top_k}, {spec.num_shared_experts} shared, {dtype.name}, "
          f"router {router.kind}, skew {args.skew}")
    print(f"  compile + first run: {result.compile_seconds:.2f} s")
    print(f"  forward: {result.median_ms:.3f} ms (median of {args.iters}) -> "
          f"{result.tokens_per_second:,.0f} tokens/s")
    received = [int(v) for v in result.stats.rank_tokens]
    # Local backend: each device computes all top-k pairs of its own tokens.
    rows = ([int(v) for v in result.rank_rows()] if config.backend == "WIDEEP"
            else [n * spec.top_k for n in received])
    label = "received tokens" if config.backend == "WIDEEP" else "computed tokens"
    print(f"  per-rank {label}: {received}  (max-mean)/mean {imbalance(received):.3f}")
    print(f"  per-rank expert rows:     {rows}  (max-mean)/mean {imbalance(rows):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wideep`` console script."""
    parser = argparse.ArgumentParser(prog="wideep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench_moe(sub)
    args = parser.parse_args(argv)
    # Emulated CPU devices must be requested before the first backend is created;
    # the flag only affects the CPU platform, so it is harmless on a GPU machine.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    try:
        return _bench_moe(args)
    except ValueError as err:  # config and argument errors: one clear line, no traceback
        print(f"wideep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
