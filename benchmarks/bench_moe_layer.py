"""MoE layer forward at DeepSeek-V3 dims: total time, its split, and peers.

Run on a GPU machine (one process, all local GPUs, EP = GPU count up to --ep):

    python benchmarks/bench_moe_layer.py            # EP4, 128 and 4096 tokens/rank
    python benchmarks/bench_moe_layer.py --small    # CPU smoke run of the same code

Rows, per (tokens/rank, routing skew):
  - WIDEEP (the config's default backends, named in the notes): the whole forward, then the same work as
    three separately jitted stages (dispatch = replica choice + plan + all-to-all;
    experts = expand/sort + two grouped GEMMs + reduce; combine = all-to-all back
    + per-token sum).
  - local peer: every GPU holds all experts and computes its own tokens (no
    communication: the layer without a mesh, run per GPU by shard_map over
    replicated weights).
  - GEMM floor: the routed-expert FLOPs of the busiest rank at the card's
    measured dense bf16 matmul rate; weight floor: the weight bytes of the
    slots that rank computes (non-empty slots only) at the card's measured copy
    rate (few rows per expert make the layer bound by reading weights, not by
    FLOPs); floor/WIDEEP uses the larger of the two.
Appends a table to benchmarks/RESULTS.md (card, date, commit).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from wideep_jax import MoEConfig, MoELayer, MoESpec, moe_forward  # noqa: E402
from wideep_jax.bench import (copy_rate, imbalance, jax_sampler, jitted_forward, median_ms,  # noqa: E402
                              ops_table, profile_ops, race, rank_rows, synthetic_routing, time_fn)
from wideep_jax.comm import get_alltoall_backend  # noqa: E402
from wideep_jax.dispatch import make_dispatch_plan  # noqa: E402
from wideep_jax.experts import routed_experts  # noqa: E402
from wideep_jax.placement import choose_slots, replica_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def stage_functions(layer: MoELayer):
    """The WIDEEP forward cut into three jitted shard_map programs."""
    spec, config, mesh = layer.spec, layer.config, layer.mesh
    axis = config.ep_axis
    ep = mesh.shape[axis]
    backend = get_alltoall_backend(config.alltoall_backend, mesh=mesh, axis=axis)
    local_slots = layer.num_slots // ep
    shard = lambda f, i, o: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=i, out_specs=o, check_vma=False))

    def dispatch(x, ids, weights, slot_to_expert):
        valid = jnp.ones(x.shape[:1], bool)
        table = replica_table(slot_to_expert, spec.num_experts)
        slots = choose_slots(ids, valid, table, rank_offset=jax.lax.axis_index(axis))
        plan = make_dispatch_plan(slots, weights, valid, num_ranks=ep, slots_per_rank=local_slots)
        return plan, backend.dispatch(x, plan, axis_name=axis)

    def experts(recv, w_gate_up, w_down):
        rows = recv.x.shape[0] * recv.x.shape[1]
        out = routed_experts(recv.x.reshape(rows, -1), recv.slot.reshape(rows, -1),
                             recv.weight.reshape(rows, -1), recv.valid_rows().reshape(rows),
                             w_gate_up, w_down, weight_on_input=spec.apply_router_weight_on_input)
        return out.partial.reshape(recv.x.shape)

    def combine(partial, plan, recv_count):
        return backend.combine(partial, plan, recv_count, axis_name=axis).astype(spec.dtype)

    t, r = P(axis), P()
    return (shard(dispatch, (t, t, t, r), t), shard(experts, (t, t, t), t), shard(combine, (t, t, t), t))


def dense_rate(iters: int, *, batch: int = 1) -> float:
    """Measured bf16 matmul rate (FLOP/s) of one device, on random data (``batch`` back-to-back
    calls per sample, as the forward is timed: one call alone includes its launch gap)."""
    n = 8192 if jax.default_backend() == "gpu" else 512
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2))
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / (median_ms(time_fn(lambda: f(a, b), iters=iters, batch=batch)) / 1e3)


def commit() -> str:
    """The git commit measured (WIDEEP_COMMIT where the tree travels without .git)."""
    if os.environ.get("WIDEEP_COMMIT"):
        return os.environ["WIDEEP_COMMIT"]
    try:
        here = Path(__file__).parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
        head = out.stdout.strip()
        if not head:
            return "unknown"
        # A tree that differs from HEAD (edits, or a copy carrying a stale .git) is not HEAD;
        # RESULTS.md itself is what the benchmarks write.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/RESULTS.md"], capture_output=True, text=True,
                                 cwd=here.parent).stdout.strip()
        return head + ("+modified" if changed else "")
    except OSError:
        return "unknown"


def backends_text(config, mesh, spec) -> str:
    """The all-to-all and expert kernel a config resolves to here, for result notes."""
    from pallas_kernels.grouped_matmul.api import default_implementation
    from wideep_jax.comm import resolve_alltoall_backend

    comm = resolve_alltoall_backend(config.alltoall_backend, mesh, config.ep_axis)
    kernel = config.expert_kernel
    if kernel == "auto":
        kernel = f"auto = {default_implementation(spec.dtype, spec.hidden_size, 2 * spec.intermediate_size)}"
    return f"{comm} all-to-all, expert kernel {kernel}"


def publish(text: str, *, write: bool) -> None:
    """Prints a result section and, if ``write``, appends it to RESULTS.md."""
    print(text)
    if write:
        with RESULTS.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")


def check_ep(ep: int) -> None:
    """Exits with a message when ``ep`` ranks do not fit this machine's devices."""
    if not 1 <= ep <= jax.device_count():
        sys.exit(f"--ep {ep}: this machine has {jax.device_count()} {jax.default_backend()} devices; "
                 f"allowed 1..{jax.device_count()} (CPU: set XLA_FLAGS=--xla_force_host_platform_device_count=N)")


MODELS = {
    "deepseek_v3": MoESpec.deepseek_v3,
    "llama4_scout": MoESpec.llama4,
    "llama4_maverick": lambda **kw: MoESpec.llama4(**({"num_experts": 128} | kw)),
}


def setup(ep: int, small: bool, *, small_hidden: int = 256, small_intermediate: int = 128,
          model: str = "deepseek_v3"):
    """``(ep, mesh, spec, card)``: EP over the first ``ep`` devices and the MoE layer
    dims of ``model`` (a key of MODELS), or float32 scaled-down dims for a CPU smoke run."""
    check_ep(ep)
    mesh = jax.make_mesh((ep,), ("ep",), devices=jax.devices()[:ep])
    spec = MODELS[model]()
    if small:
        spec = MODELS[model](hidden_size=small_hidden, intermediate_size=small_intermediate,
                             num_experts=max(64, spec.num_experts), dtype=jnp.float32, param_dtype=jnp.float32)
    return ep, mesh, spec, f"{ep}x {jax.devices()[0].device_kind}"


def describe(spec: MoESpec) -> str:
    """The layer's dims and routing in words, for the RESULTS notes."""
    router = spec.router
    routing = {"noaux_tc": f"noaux_tc routing, {router.n_group} groups/{router.topk_group} kept",
               "llama4": "llama4 routing (sigmoid of the top logit)",
               "softmax": "softmax routing"}[router.kind]
    where = ", weight on the expert input" if spec.apply_router_weight_on_input else ""
    return (f"hidden {spec.hidden_size}, {spec.num_experts} experts x {spec.intermediate_size}, top-{spec.top_k}, "
            f"{routing}{where}, {spec.num_shared_experts} shared, {jnp.dtype(spec.dtype).name}")


def all_experts_local(spec: MoESpec, mesh):
    """``forward(x, routing)`` with every expert on every GPU, each computing its own
    tokens: the layer without a mesh, per device, over replicated weights."""
    layer = MoELayer(spec, MoEConfig(backend="CUTLASS"), mesh=None, rngs=nnx.Rngs(0))
    weights = jax.device_put(layer.weights(), NamedSharding(mesh, P()))
    per_device = jax.shard_map(
        lambda w, x, r: moe_forward(x, w, spec=spec, config=layer.config, routing=r)[0],
        mesh=mesh, in_specs=(P(), P("ep"), P("ep")), out_specs=P("ep"), check_vma=False)
    forward = jax.jit(per_device)
    return lambda x, routing: forward(weights, x, routing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--model", choices=sorted(MODELS), default="deepseek_v3", help="whose MoE layer dims")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--skews", nargs="+", default=["0", "1.2"], help="Zipf exponents; 0 = uniform")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5, help="back-to-back calls per timed sample")
    parser.add_argument("--sustain", type=float, default=0.0,
                        help="seconds each timed sample first runs its entry back to back (each entry at "
                             "its own steady clock under the card's power cap)")
    parser.add_argument("--small", action="store_true", help="scaled-down dims (CPU smoke run)")
    parser.add_argument("--no-local", action="store_true", help="skip the all-experts-local peer")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--profile", action="store_true",
                        help="print each case's top device ops of one WIDEEP forward (GPU 0)")
    args = parser.parse_args()
    if args.batch < 1 or args.sustain < 0:
        raise SystemExit(f"--batch {args.batch} must be >= 1 and --sustain {args.sustain} >= 0 seconds")

    ep, mesh, spec, card = setup(args.ep, args.small, model=args.model)
    wide = MoELayer(spec, MoEConfig(backend="WIDEEP"), mesh=mesh, rngs=nnx.Rngs(0))
    stages = stage_functions(wide)
    forward = jitted_forward(wide)
    local_forward = None
    if not args.no_local:
        local_forward = all_experts_local(spec, mesh)
    rate, bandwidth = dense_rate(args.iters, batch=args.batch), copy_rate(args.iters, batch=args.batch)
    flops_per_row = 2 * spec.hidden_size * 3 * spec.intermediate_size
    bytes_per_slot = 3 * spec.hidden_size * spec.intermediate_size * jnp.dtype(spec.param_dtype).itemsize
    tok_sharding = NamedSharding(mesh, P("ep"))

    rows = []
    for tokens in args.tokens:
        for skew in map(float, args.skews):
            n = tokens * ep
            x = jax.device_put(jax.random.normal(jax.random.key(1), (n, spec.hidden_size)).astype(spec.dtype),
                               tok_sharding)
            routing = jax.device_put(
                synthetic_routing(jax.random.key(2), n, spec.num_experts, spec.top_k, skew), tok_sharding)
            _, stats = forward(x, routing)
            w = wide.weights()
            plan, recv = stages[0](x, routing.ids, routing.weights, w.slot_to_expert)
            partial = stages[1](recv, w.w_gate_up, w.w_down)
            entries = {"total": lambda: forward(x, routing),
                       "dispatch": lambda: stages[0](x, routing.ids, routing.weights, w.slot_to_expert),
                       "experts": lambda: stages[1](recv, w.w_gate_up, w.w_down),
                       "combine": lambda: stages[2](partial, plan, recv.count)}
            if local_forward is not None:
                entries["local"] = lambda: local_forward(x, routing)
            for fn in entries.values():  # compile and warm up, outside the timed turns
                time_fn(fn, iters=0)
            # The forward, its stages and the local peer take turns, so they see the same clock drift.
            times = race({name: jax_sampler(fn, batch=args.batch, sustain_s=args.sustain)
                          for name, fn in entries.items()}, args.iters)
            total, t_dispatch, t_experts, t_combine = (times[name] for name in
                                                       ("total", "dispatch", "experts", "combine"))
            rows_per_rank = rank_rows(stats, ep)
            floor = rows_per_rank.max() * flops_per_row / rate * 1e3
            used_slots = (np.asarray(stats.slot_counts).reshape(ep, -1) > 0).sum(axis=1).max()
            weight_floor = used_slots * bytes_per_slot / bandwidth * 1e3
            t_local = times.get("local", float("nan"))
            rows.append(dict(tokens=tokens, skew=skew, total=total, dispatch=t_dispatch, experts=t_experts,
                             combine=t_combine, local=t_local, floor=floor, weight_floor=weight_floor,
                             imbalance=imbalance(rows_per_rank)))
            print(f"tokens/rank {tokens} skew {skew}: total {total:.3f} ms", flush=True)
            if args.profile:
                ops, busy, wall = profile_ops(lambda: forward(x, routing))
                print(f"  profile of one forward: {ops_table(ops, busy, wall, top=25)}", flush=True)

    header = ("| tokens/rank | routing | WIDEEP fwd ms | dispatch ms | experts ms | combine ms | "
              "local (all experts) ms | WIDEEP/local | GEMM floor ms | weight floor ms | floor/WIDEEP | "
              "rank imbalance |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        skew = "uniform" if r["skew"] == 0 else f"zipf {r['skew']}"
        lines.append(
            f"| {r['tokens']} | {skew} | {r['total']:.3f} | {r['dispatch']:.3f} | {r['experts']:.3f} | "
            f"{r['combine']:.3f} | {r['local']:.3f} | {r['total'] / r['local']:.2f} | {r['floor']:.3f} | "
            f"{r['weight_floor']:.3f} | {max(r['floor'], r['weight_floor']) / r['total']:.3f} | "
            f"{r['imbalance']:.3f} |")
    table = "\n".join(lines)
    dims = f"{args.model}'s MoE layer: {describe(spec)}"
    title = (f"## bench_moe_layer: {card}, EP{ep}, {datetime.date.today()}, commit {commit()}, "
             f"jax {jax.__version__}")
    notes = (f"{dims}. {backends_text(wide.config, mesh, spec)}. "
             f"Dense bf16 matmul measured at {rate / 1e12:.0f} TFLOP/s, copy at {bandwidth / 1e9:.0f} GB/s "
             f"(read + write); median of {args.iters} samples of {args.batch} back-to-back calls, the forward, "
             f"its stages and the local peer timed in turns"
             + (f", each sample after {args.sustain:g} s of the same calls untimed" if args.sustain else "") + ".")
    publish(f"\n{title}\n\n{notes}\n\n{table}\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
