"""EPLB: layer time under skewed routing without / with offline / with online balancing,
the cost of an online update, and the placement solve time.

Run on a GPU machine (one process, EP = GPU count up to --ep):

    python benchmarks/bench_eplb.py             # DeepSeek-V3 layer dims
    python benchmarks/bench_eplb.py --small     # CPU smoke run of the same code

Sections (one table each, appended to benchmarks/RESULTS.md):
  1. MoE layer forward with Zipf-skewed routing (a fixed expert popularity; samples
     drawn before timing, a different one each call): no balancer (one slot per
     expert); offline (placement solved from a calibration batch, ``num_slots``
     slots); online (``layer_updates_per_iter: 1``, after warm-up iterations).
     Rank imbalance is (max-mean)/mean of the expert rows per rank.
  2. Online step overhead: forward alone vs forward + ``OnlineBalancer.step`` (the
     routing sampling is outside both).
  3. Re-sharding one layer: slots moved, bytes, time and GB/s for the host mode
     (pinned_host master copy sharded over the EP group, or replicated per
     device) and the collective mode (ppermute from old slots).
  4. Placement solve time (61 layers x 256 experts -> 288 slots, 32 ranks) and
     quality against the plain greedy, on the default device and on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from bench_moe_layer import backends_text, commit, publish, setup  # noqa: E402
from wideep_jax import MoELayer, load_moe_config  # noqa: E402
from wideep_jax.bench import imbalance, jitted_forward, median_ms, rank_rows, time_fn  # noqa: E402
from wideep_jax.eplb.algorithm import compute_placement, greedy_placement, rank_loads  # noqa: E402
from wideep_jax.eplb.balancer import OnlineBalancer  # noqa: E402
from wideep_jax.eplb.online import _reshard  # noqa: E402
from wideep_jax.eplb.state import EplbConfig  # noqa: E402
from wideep_jax.eplb.resharding import make_master_copy  # noqa: E402
from wideep_jax.placement import choose_slots, replica_table  # noqa: E402
from wideep_jax.routing import Routing  # noqa: E402

def popularity(num_experts: int, exponent: float, seed: int = 0) -> jax.Array:
    """Log-probabilities of a Zipf(exponent) popularity over a fixed random ranking."""
    rank = jax.random.permutation(jax.random.key(seed), num_experts) + 1
    return -exponent * jnp.log(rank.astype(jnp.float32))


def sample_routing(key, log_p, num_tokens: int, top_k: int) -> Routing:
    """Top-k distinct experts per token drawn from ``log_p`` (Gumbel top-k)."""
    k1, k2 = jax.random.split(key)
    _, ids = jax.lax.top_k(log_p[None] + jax.random.gumbel(k1, (num_tokens, log_p.shape[0])), top_k)
    weights = jax.nn.softmax(jax.random.normal(k2, (num_tokens, top_k)), axis=-1)
    return Routing(ids.astype(jnp.int32), weights)


def layer_section(spec, mesh, ep, tokens, skew, num_slots, iters, warmup_updates):
    sharding = NamedSharding(mesh, P("ep"))
    log_p = popularity(spec.num_experts, skew)
    n = tokens * ep
    sample = jax.jit(lambda k: sample_routing(k, log_p, n, spec.top_k), out_shardings=sharding)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (n, spec.hidden_size)).astype(spec.dtype), sharding)
    # Drawn before any timing (a Gumbel top-k over every expert costs about as much as a
    # small forward): the timed calls take them in turn, a different sample each call.
    routings = jax.block_until_ready([sample(jax.random.key(100 + i))
                                      for i in range(max(iters, warmup_updates))])
    rows = {}

    def measure(layer, name):
        forward = jitted_forward(layer)
        turn = itertools.count()
        times = time_fn(lambda: forward(x, routings[next(turn) % len(routings)]), iters=iters)
        loads, traffic = [], []
        local_first = layer.config.replica_selection == "local_first"
        for routing in routings[:iters]:
            _, stats = forward(x, routing)
            loads.append(imbalance(rank_rows(stats, ep)))
            traffic.append(offrank_copies(routing.ids, layer.slot_to_expert[...], spec.num_experts, ep, local_first))
        rows[name] = dict(ms=median_ms(times), imbalance=float(np.mean(loads)), slots=layer.num_slots,
                          traffic=float(np.mean(traffic)))
        print(f"  {name}: {rows[name]}", flush=True)
        return forward

    base = MoELayer(spec, load_moe_config({"backend": "WIDEEP"}), mesh=mesh, rngs=nnx.Rngs(0))
    forward = measure(base, "none")
    # Offline: a calibration batch (other samples of the same popularity) -> placement file content.
    _, calib = forward(x, sample(jax.random.key(7)))
    placement = np.asarray(compute_placement(calib.expert_counts.astype(jnp.float32), num_slots, ep))
    del base, forward
    offline_cfg = {"backend": "WIDEEP", "load_balancer": {
        "num_slots": num_slots, "initial_global_assignments": {0: placement.tolist()}}}
    offline = MoELayer(spec, load_moe_config(offline_cfg, num_experts=spec.num_experts, ep_size=ep),
                       mesh=mesh, layer_idx=0, rngs=nnx.Rngs(0))
    measure(offline, "offline")
    del offline
    offline_cfg["replica_selection"] = "local_first"
    offline = MoELayer(spec, load_moe_config(offline_cfg, num_experts=spec.num_experts, ep_size=ep),
                       mesh=mesh, layer_idx=0, rngs=nnx.Rngs(0))
    measure(offline, "offline, local_first")
    del offline

    online_cfg = {"backend": "WIDEEP", "load_balancer": {"num_slots": num_slots, "layer_updates_per_iter": 1}}
    online = MoELayer(spec, load_moe_config(online_cfg, num_experts=spec.num_experts, ep_size=ep),
                      mesh=mesh, rngs=nnx.Rngs(0))
    balancer = OnlineBalancer([online])
    step_forward = jax.jit(lambda w, x, r: online_forward(online, w, x, r))
    moved = []
    for i in range(warmup_updates):
        _, stats = step_forward(online.weights(), x, routings[i])
        moved.append(int(balancer.step([stats]).moved_slots.sum()))
    measure(online, "online")
    rows["online"]["moved_per_update"] = float(np.mean(moved[1:])) if len(moved) > 1 else float("nan")

    # Overhead: forward alone vs forward + balancer step, per iteration.
    def run(with_step: bool, count: int):
        start = time.perf_counter()
        for i in range(count):
            out = step_forward(online.weights(), x, routings[i % len(routings)])
            if with_step:
                balancer.step([out[1]])
        # The forwards' outputs too: without a step the weights do not depend on them,
        # and blocking on the weights alone would time only their dispatch.
        jax.block_until_ready((out, online.weights()))
        return (time.perf_counter() - start) / count * 1e3

    run(True, 2)
    run(False, 2)
    rows["overhead"] = dict(forward=run(False, iters), with_step=run(True, iters))
    print(f"  overhead: {rows['overhead']}", flush=True)
    return rows, online, balancer


def offrank_copies(ids, placement, num_experts: int, ep: int, local_first: bool) -> float:
    """Token copies sent to other ranks per token (each token goes to a rank at most once)."""
    ids, placement = np.asarray(ids), np.asarray(placement)
    table = replica_table(jnp.asarray(placement), num_experts)
    per_rank_slots = placement.shape[0] // ep
    ids = jnp.asarray(ids).reshape(ep, -1, ids.shape[-1])

    def sent(rank, rank_ids):
        valid = jnp.ones(rank_ids.shape[:1], bool)
        slots = choose_slots(rank_ids, valid, table, rank_offset=rank,
                             local_rank=rank if local_first else None, num_ranks=ep)
        to_rank = (slots[..., None] // per_rank_slots == jnp.arange(ep)).any(axis=1)  # [T_r, ep]
        return to_rank.sum() - to_rank[:, rank].sum()

    total = jax.vmap(sent)(jnp.arange(ep), ids).sum()
    return float(total) / (ids.shape[0] * ids.shape[1])


def online_forward(layer, weights, x, routing):
    from wideep_jax.moe import moe_forward
    return moe_forward(x, weights, spec=layer.spec, config=layer.config, mesh=layer.mesh, routing=routing)


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reshard_section(layer, balancer, mesh, ep, iters, with_replicated):
    """Times moving n slots per rank of one layer, host and collective."""
    current = np.asarray(layer.slot_to_expert[...])
    per_rank = layer.num_slots // ep
    weights = [(layer.w_gate_up[...], layer.w_down[...])]
    slot_bytes = sum(a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in weights[0])
    out = []
    rng = np.random.default_rng(0)
    modes = ["host", "collective"]
    expert_bytes = slot_bytes * layer.spec.num_experts
    if with_replicated and expert_bytes * ep * 3 < available_host_bytes():
        modes.insert(1, "host_replicated")
    for mode in modes:
        config = EplbConfig(num_layers=1, num_experts=layer.spec.num_experts, num_slots=layer.num_slots,
                            ep_size=ep, reshard="collective" if mode == "collective" else "host")
        replicated = mode == "host_replicated"
        master = {"host": balancer.master,
                  "host_replicated": [make_master_copy(weights[0], current, layer.spec.num_experts, mesh,
                                                       replicated=True)],
                  "collective": None}[mode]
        step = jax.jit(lambda w, o, n, m, config=config, replicated=replicated: _reshard(
            w, o, n, m, config=config, mesh=mesh, axis="ep", master_replicated=replicated), donate_argnums=0)
        singles = [np.flatnonzero(np.bincount(current, minlength=layer.spec.num_experts)[r] == 1)
                   for r in current.reshape(ep, per_rank)]
        most = min(len(x) for x in singles)
        for changed in sorted(n for n in {1, 8, most} if 0 < n <= most):
            # Rank r takes the `changed` singly-held experts of rank r-1 (a valid placement).
            new = current.reshape(ep, per_rank).copy()
            cols = [rng.choice(x, changed, replace=False) for x in singles]
            for r in range(ep):
                new[r, cols[r]] = current.reshape(ep, per_rank)[r - 1, cols[r - 1]]
            new = new.reshape(-1)
            moved = int((new != current).reshape(ep, per_rank).sum(axis=1).max())
            old_a, new_a = jnp.asarray(current)[None], jnp.asarray(new)[None]
            weights = step(weights, old_a, new_a, master)  # compile; moves to `new`
            times = []
            for i in range(iters):  # alternate directions so every call moves `moved` slots
                a, b = (new_a, old_a) if i % 2 == 0 else (old_a, new_a)
                start = time.perf_counter()
                weights = jax.block_until_ready(step(weights, a, b, master))
                times.append(time.perf_counter() - start)
            if iters % 2 == 0:
                weights = step(weights, new_a, old_a, master)  # back to the layer's placement
            ms = median_ms(times)
            out.append(dict(mode=mode, moved=moved, mb=moved * slot_bytes / 1e6, ms=ms,
                            gbs=moved * slot_bytes / (ms / 1e3) / 1e9))
            print(f"  reshard {out[-1]}", flush=True)
    return out


def solve_section(iters):
    rng = np.random.default_rng(0)
    load = rng.gamma(0.5, size=(61, 256)).astype(np.float32) * 1000
    drifted = (load * rng.lognormal(0.0, 0.1, load.shape)).astype(np.float32)
    rows = []
    for device in {jax.devices()[0], jax.devices("cpu")[0]}:
        with jax.default_device(device):
            solve = jax.jit(lambda l: compute_placement(l, 288, 32))
            migrate = jax.jit(lambda l, c: compute_placement(l, 288, 32, current=c, tolerance=0.01))
            greedy = jax.jit(lambda l: greedy_placement(l, 288, 32))
            lj, dj = jax.device_put(load, device), jax.device_put(drifted, device)
            current = solve(lj)
            ms = median_ms(time_fn(lambda: solve(lj), iters=iters))
            ms_migrate = median_ms(time_fn(lambda: migrate(dj, current), iters=iters))
            ms_greedy = median_ms(time_fn(lambda: greedy(lj), iters=iters))
            ours = np.asarray(rank_loads(lj, solve(lj), 32))
            base = np.asarray(rank_loads(lj, greedy(lj), 32))
            moved = int((np.asarray(migrate(dj, current)) != np.asarray(current)).sum())
            moved_fresh = int((np.asarray(solve(dj)) != np.asarray(current)).sum())
        imb = lambda r: float(np.mean(r.max(1) / r.mean(1) - 1))
        rows.append(dict(device=device.device_kind, ms=ms, migrate_ms=ms_migrate, greedy_ms=ms_greedy,
                         ours=imb(ours), greedy=imb(base), moved=moved, moved_fresh=moved_fresh))
        print(f"  solve {rows[-1]}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--skew", type=float, default=1.2)
    parser.add_argument("--extra-slots", type=int, default=32, help="num_slots = experts + this")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup-updates", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="scaled-down dims (CPU smoke run)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--replicated-master", action="store_true",
                        help="also time the per-device replicated master copy (EP x the experts' bytes of "
                             "host memory; skipped when that does not fit 3 times in available memory)")
    args = parser.parse_args()

    ep, mesh, spec, card = setup(args.ep, args.small, small_hidden=128, small_intermediate=64)
    num_slots = spec.num_experts + args.extra_slots
    lines, overheads = [], []
    for tokens in args.tokens:
        print(f"tokens/rank {tokens}", flush=True)
        rows, layer, balancer = layer_section(spec, mesh, ep, tokens, args.skew, num_slots, args.iters,
                                              args.warmup_updates)
        base = rows["none"]["ms"]
        for name in ("none", "offline", "offline, local_first", "online"):
            r = rows[name]
            lines.append(f"| {tokens} | {name} | {r['slots']} | {r['ms']:.3f} | {base / r['ms']:.2f} | "
                         f"{r['imbalance']:.3f} | {r['traffic']:.2f} | "
                         f"{r.get('moved_per_update', float('nan')):.1f} |")
        o = rows["overhead"]
        overheads.append(f"| {tokens} | {o['forward']:.3f} | {o['with_step']:.3f} | "
                         f"{o['with_step'] / o['forward']:.3f} |")
    reshard = reshard_section(layer, balancer, mesh, ep, args.iters, args.replicated_master)
    del layer, balancer
    solve = solve_section(args.iters)

    title = (f"## bench_eplb: {card}, EP{ep}, {datetime.date.today()}, commit {commit()}, jax {jax.__version__}")
    notes = (f"hidden {spec.hidden_size}, {spec.num_experts} experts x {spec.intermediate_size}, top-{spec.top_k}, "
             f"{jnp.dtype(spec.dtype).name}; Zipf {args.skew} popularity over a fixed ranking, "
             f"{max(args.iters, args.warmup_updates)} samples drawn before timing, a different one each call "
             f"(timed: the forward, and the online step where named); balanced modes use {num_slots} slots; "
             f"median of {args.iters}. "
             f"{backends_text(load_moe_config({'backend': 'WIDEEP'}), mesh, spec)}.")
    t1 = "\n".join(["| tokens/rank | balancer | slots | fwd ms | speed-up vs none | rank imbalance | "
                    "off-rank copies/token | slots moved/update |", "|" + "---|" * 8] + lines)
    t2 = "\n".join(["| tokens/rank | fwd only ms/iter | fwd + online step ms/iter | ratio |", "|---|---|---|---|",
                    *overheads])
    t3 = "\n".join(["| mode | slots moved (busiest rank) | MB moved per rank | ms | GB/s per rank |",
                    "|---|---|---|---|---|"] + [f"| {r['mode']} | {r['moved']} | {r['mb']:.0f} | {r['ms']:.2f} | "
                                                 f"{r['gbs']:.1f} |" for r in reshard])
    t4 = "\n".join(["| device | solve ms (ours) | solve ms (greedy) | imbalance ours | imbalance greedy | "
                     "migration-aware re-solve ms | slots moved, migration-aware / fresh |",
                     "|---|---|---|---|---|---|---|"]
                    + [f"| {r['device']} | {r['ms']:.2f} | {r['greedy_ms']:.2f} | {r['ours']:.4f} | "
                       f"{r['greedy']:.4f} | {r['migrate_ms']:.2f} | {r['moved']} / {r['moved_fresh']} |"
                       for r in solve])
    text = (f"\n{title}\n\n{notes}\n\nLayer forward:\n\n{t1}\n\nOnline overhead (one layer, updated every "
            f"iteration):\n\n{t2}\n\nRe-sharding one layer:\n\n{t3}\n\nPlacement solve (61 layers x 256 experts -> "
            f"288 slots, 32 ranks, gamma(0.5) loads; re-solve after a lognormal(0.1) drift with the old placement "
            f"as `current`, tolerance 0.01, of 17568 slots):\n\n{t4}\n")
    publish(text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
