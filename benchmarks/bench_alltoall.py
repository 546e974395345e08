"""Dispatch and combine of the communication backends at DeepSeek-V3 shapes.

    python benchmarks/bench_alltoall.py                 # all GPUs of this host, 128 and 4096 tokens/rank
    python benchmarks/bench_alltoall.py --tokens 128 4096 16384
    python benchmarks/bench_alltoall.py --small         # CPU smoke run (xla backend only)

One process, every backend over the same plan on the same cards: ours (`nvlink`,
`nccl`) and the portable `xla` path (XLA's all_to_all on padded buffers), plus
torch's NCCL `all_to_all_single` with the same splits (run first, in spawned
processes, one per GPU) where torch is installed.

Hidden 7168 bf16, top-8 of 256 experts, uniform routing; each token goes once
to every rank holding one of its experts. Each op runs `--loop` times inside one
jitted, unrolled `fori_loop` (no per-iteration loop condition read back by the
host), so the time is the device's, not the host's dispatch; the time per op
is the slope between loops of `--loop` and twice as many ops, so what every
run pays once (launch, sync, the GPUs' start skew) is not spread over the ops. GB/s
per GPU = bytes of real token rows leaving the GPU (to other ranks) / time, the
same count for every backend. Before a backend is timed, one dispatch and combine of it
on the timed inputs must equal the xla backend's (rows, slots, weights and counts
exactly, combined tokens to float32 rounding); one that differs is not timed, and the
script exits 1 after the table. Appends a table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

HIDDEN, EXPERTS, TOP_K = 7168, 256, 8


def routing(seed: int, ranks: int, tokens: int, experts: int):
    """[R*T, K] distinct experts per token (uniform) and weights."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((ranks * tokens, experts)), axis=1)[:, :TOP_K].astype(np.int32)
    weights = rng.random(ids.shape).astype(np.float32)
    return ids, weights / weights.sum(1, keepdims=True)


def row_counts(ids: np.ndarray, ranks: int, tokens: int, experts: int) -> np.ndarray:
    """[src, dst] deduplicated rows each rank sends each rank."""
    dest = ids // (experts // ranks)
    goes = (dest[:, :, None] == np.arange(ranks)).any(1).reshape(ranks, tokens, ranks)
    return goes.sum(1)


# ----------------------------------------------------------------------------- torch peer


def _torch_worker(rank, ranks, counts, hidden, loops, queue):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=ranks, init_method="tcp://127.0.0.1:29533",
                            device_id=torch.device("cuda", rank))
    send = [int(c) * hidden for c in counts[rank]]
    recv = [int(counts[s][rank]) * hidden for s in range(ranks)]
    x = torch.randn(sum(send), dtype=torch.bfloat16, device="cuda")
    out = torch.empty(sum(recv), dtype=torch.bfloat16, device="cuda")
    times = {}
    for name, (o, i, os_, is_) in {"dispatch": (out, x, recv, send), "combine": (x, out, send, recv)}.items():
        for _ in range(3):
            dist.all_to_all_single(o, i, os_, is_)
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(loops):
            dist.all_to_all_single(o, i, os_, is_)
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / loops * 1e3  # µs
    queue.put((rank, times))
    dist.destroy_process_group()


def torch_peer(counts: np.ndarray, hidden: int, loops: int) -> dict | None:
    """µs per call of torch's NCCL all_to_all_single with the plan's splits (slowest rank)."""
    try:
        import torch
        import torch.multiprocessing as mp
    except ImportError:
        return None
    ranks = counts.shape[0]
    if not torch.cuda.is_available() or torch.cuda.device_count() < ranks:
        return None  # too few GPUs: main refuses the --ep (a rank without a GPU would hang the others)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_torch_worker, args=(r, ranks, counts.tolist(), hidden, loops, queue))
             for r in range(ranks)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {op: max(t[op] for _, t in results) for op in ("dispatch", "combine")}


# ----------------------------------------------------------------------------- ours


def _touch(a, acc):
    """``a`` plus ``acc * 0`` at its first element: ties a loop step's input to the previous step."""
    return a.at[(0,) * a.ndim].add((acc * 0).astype(a.dtype))


def _firsts(tree):
    """The sum of each output's first element (float32), read through an optimization
    barrier: XLA computes every element of every output. Reading one element alone, it
    may drop an output no one reads (the xla backend's weight all-to-all) or compute
    only the elements read."""
    import jax
    import jax.numpy as jnp

    leaves = jax.lax.optimization_barrier(jax.tree.leaves(tree))
    return sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in leaves)


def op_loops(comm, ranks: int, slots_per_rank: int):
    """``(dispatch_loop, combine_loop)``: shard_map bodies ``f(loops, x, slots, w)`` running the
    op ``loops`` times in one unrolled ``fori_loop``, each op depending on the previous one."""
    import jax
    import jax.numpy as jnp

    from wideep_jax.dispatch import make_dispatch_plan

    def plan_of(slots, w):
        return make_dispatch_plan(slots, w, jnp.ones(slots.shape[:1], bool), num_ranks=ranks,
                                  slots_per_rank=slots_per_rank)

    def dispatch_loop(loops, x, slots, w):
        plan = plan_of(slots, w)

        def step(i, carry):
            x, plan, acc = carry
            x = _touch(x, acc)  # in place: defeats loop-invariant hoisting
            if comm.name == "xla":
                # Its slot/count and weight all-to-alls read only the plan: left fixed, XLA ran
                # them once per loop (and dropped the unread weights), timing one collective of three.
                plan = plan._replace(send_slot=_touch(plan.send_slot, acc),
                                     send_weight=_touch(plan.send_weight, acc))
            recv = comm.dispatch(x, plan, axis_name="ep")
            return x, plan, acc + _firsts(recv)

        return jax.lax.fori_loop(0, loops, step, (x, plan, jnp.float32(0)), unroll=True)[2][None]

    def combine_loop(loops, x, slots, w):
        plan = plan_of(slots, w)
        recv = comm.dispatch(x, plan, axis_name="ep")
        partial = recv.x

        def step(i, carry):
            p, acc = carry
            p = _touch(p, acc)
            y = comm.combine(p, plan, recv.count, axis_name="ep")
            return p, acc + _firsts(y)

        return jax.lax.fori_loop(0, loops, step, (partial, jnp.float32(0)), unroll=True)[1][None]

    return dispatch_loop, combine_loop


def one_round(comm, mesh, x, slots, w, experts: int) -> dict:
    """One dispatch and one combine (of the received rows) on the timed inputs: the received
    rows' counts, rows, slots and weights (padding rows zeroed: backends need not write
    them) and the combined tokens, left on the devices (at 16384 tokens a rank receives
    ~1 GB of rows: the host took most of a minute to fetch and compare such buffers)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from wideep_jax.dispatch import make_dispatch_plan

    ranks = mesh.shape["ep"]

    def body(x, slots, w):
        plan = make_dispatch_plan(slots, w, jnp.ones(slots.shape[:1], bool), num_ranks=ranks,
                                  slots_per_rank=experts // ranks)
        recv = comm.dispatch(x, plan, axis_name="ep")
        live = recv.valid_rows()[..., None]
        y = comm.combine(jnp.where(live, recv.x, 0), plan, recv.count, axis_name="ep")
        return (recv.count[None], jnp.where(live, recv.x, 0)[None], jnp.where(live, recv.slot, 0)[None],
                jnp.where(live, recv.weight, 0)[None], y)

    tok = P("ep")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok), out_specs=tok, check_vma=False))
    return dict(zip(("count", "rows", "slot", "weight", "combined"), f(x, slots, w)))


def differences(got: dict, want: dict) -> list[str]:
    """What of ``got`` (`one_round`'s) differs from ``want``: counts, rows, slots and weights
    exactly; the combined tokens to float32 rounding (backends may add the ranks' partial
    sums in another order)."""
    import jax.numpy as jnp

    wrong = [name for name in ("count", "rows", "slot", "weight") if not jnp.array_equal(got[name], want[name])]
    a, b = got["combined"], want["combined"]
    if not jnp.allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max())):
        wrong.append(f"combined (max error {float(jnp.abs(a - b).max()):.3g})")
    return wrong


def make_comm(backend_name: str, mesh):
    """The backend a --backends entry names; refuses $WIDEEP_ALLTOALL, which would run another
    backend under this row's name."""
    from wideep_jax.comm import ENV_VAR, get_alltoall_backend

    if os.environ.get(ENV_VAR):
        raise SystemExit(f"{ENV_VAR}={os.environ[ENV_VAR]!r} would replace every --backends entry; "
                         f"allowed: unset it (bench_alltoall picks backends with --backends)")
    if backend_name.startswith("nvlink:"):  # nvlink:N[:S] = at most N CTAs per call, S of them sending
        from wideep_jax.comm.nvlink import NvlinkAllToAll

        sizes = [int(v) or None for v in backend_name.split(":")[1:]] + [None]
        return NvlinkAllToAll(mesh, "ep", max_ctas=sizes[0], send_ctas=sizes[1])
    return get_alltoall_backend(backend_name, mesh=mesh, axis="ep")


def bench_inputs(mesh, ids, weights, tokens: int, hidden: int, dtype) -> tuple:
    """``(x, slots, w)`` sharded over the EP axis: random token rows and the routing."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(mesh, P("ep"))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (mesh.shape["ep"] * tokens, hidden), dtype), sharding)
    slots = jax.device_put(jnp.asarray(ids), sharding)  # one slot per expert: slot == expert
    return x, slots, jax.device_put(jnp.asarray(weights), sharding)


def jax_times(backend_name: str, mesh, inputs: tuple, experts: int, loops: int, iters: int,
              reference: dict) -> dict:
    """Per-op times of one backend on ``inputs`` (`bench_inputs`); first its outputs are
    checked against ``reference`` (`one_round` of the xla backend): a backend that moves
    the wrong rows is not timed (``{"wrong": [...]}``)."""
    import jax
    from jax.sharding import PartitionSpec as P

    from wideep_jax.bench import seconds_per_call
    from wideep_jax.comm import ffi_lib

    ranks = mesh.shape["ep"]
    comm = make_comm(backend_name, mesh)
    if wrong := differences(one_round(comm, mesh, *inputs, experts), reference):
        return {"wrong": wrong}
    dispatch_loop, combine_loop = op_loops(comm, ranks, experts // ranks)
    tok = P("ep")
    x, slots, w = inputs
    out = {}
    for name, body in (("dispatch", dispatch_loop), ("combine", combine_loop)):
        def build(n, body=body):
            f = jax.jit(jax.shard_map(functools.partial(body, n), mesh=mesh, in_specs=(tok, tok, tok),
                                      out_specs=tok, check_vma=False))
            jax.block_until_ready(f(x, slots, w))
            return lambda: f(x, slots, w)

        built = {n: build(n) for n in (loops, 2 * loops)}  # compiled before the profile's reset
        profiled = getattr(comm, "workspaces", ())
        for ws in profiled:
            for d in mesh.devices.flat:
                ffi_lib.nvlink_profile(ws, d, reset=True)
        # µs per op: the slope between loops and 2 x loops ops (the combine loop's one
        # dispatch and every run's launch, sync and start skew cancel).
        out[name] = seconds_per_call(built.__getitem__, loops, iters=iters) * 1e6
        if profiled:  # the kernels alone: slowest device's mean
            stats = [ffi_lib.nvlink_profile(ws, d) for ws in profiled for d in mesh.devices.flat]
            out[name + "_kernel"] = max(s[name + "_us"] for s in stats if s[name + "_calls"])
            if name == "dispatch":
                out["dispatch_ready"] = max(s["dispatch_ready_us"] for s in stats if s["dispatch_calls"])
            # From each rank's trace, slowest rank of the medians: the GPU's idle time from
            # one call's end to the next one's start (most gaps fall inside a run), the
            # start-to-start interval (µs per op inside a run, loop ops included, without
            # the slope's run-to-run spread) and µs from a call's start to each stamp.
            gaps, stamps, periods = [], [], []
            for ws in profiled:
                for d in mesh.devices.flat:
                    trace = ffi_lib.nvlink_trace(ws, d, name).astype(np.int64)
                    if len(trace) > 1:
                        gaps.append(float(np.median(trace[1:, 0] - trace[:-1, -1])) / 1e3)
                        periods.append(float(np.median(np.diff(trace[:, 0]))) / 1e3)
                        stamps.append(np.median(trace[:, 1:] - trace[:, :1], axis=0) / 1e3)
            out[name + "_gap"] = max(gaps, default=float("nan"))
            out[name + "_period"] = max(periods, default=float("nan"))
            if stamps:
                out[name + "_stamps"] = np.max(stamps, axis=0)
    return out


def loop_only_us(mesh, tokens: int, hidden: int, loops: int, iters: int, dtype) -> float:
    """µs per step of the timing loop around a 1-row op: what chaining the ops costs by itself."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from wideep_jax.bench import device_loop, seconds_per_call

    tok = P("ep")
    x = jax.device_put(jnp.zeros((mesh.shape["ep"] * tokens, hidden), dtype), NamedSharding(mesh, tok))

    def build(n):
        body = device_loop(lambda x: x[:1] + 1, n)
        f = jax.jit(jax.shard_map(lambda x: body(x)[None], mesh=mesh, in_specs=tok, out_specs=tok,
                                  check_vma=False))
        return lambda: f(x)

    return seconds_per_call(build, loops, iters=iters) * 1e6


def stamp_text(t: dict) -> str:
    """'; stamps ...': the nvlink kernels' median trace stamps (µs after the call's start)."""
    if "dispatch_stamps" not in t:
        return ""
    from wideep_jax.comm.ffi_lib import NVLINK_TRACE_STAMPS

    names = [stamp.replace("_", " ") for stamp in NVLINK_TRACE_STAMPS[1:]]
    return "; stamps " + " / ".join(
        ", ".join(f"{n} {v:.1f}" for n, v in zip(names, t[op + "_stamps"])) for op in ("dispatch", "combine"))


def backend_arg(text: str) -> str:
    """A --backends entry, checked before anything runs."""
    if not re.fullmatch(r"xla|nccl|nvlink(:\d+(:\d+)?)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: xla, nccl, nvlink or nvlink:N[:S] (N, S integers "
                                         ">= 0; 0 = default)")
    return text


def check_ranks(ranks: int, experts: int) -> None:
    """Exits unless ``ranks`` divides the experts (one slot per expert, the same count on every rank)."""
    if experts % ranks:
        sys.exit(f"--ep {ranks}: {experts} experts do not split evenly; allowed: a divisor of {experts} "
                 f"(at most this host's GPU count)")


def main() -> int:
    from wideep_jax.bench import positive_int  # (imports jax: no GPU memory taken until first used)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=positive_int, default=None, help="EP ranks (default: every GPU, at most 8)")
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[128, 4096], help="tokens per rank")
    parser.add_argument("--loop", type=positive_int, default=50, help="ops per timed jit call")
    parser.add_argument("--iters", type=positive_int, default=5)
    parser.add_argument("--backends", type=backend_arg, nargs="+", default=["xla", "nccl", "nvlink"],
                        help="xla, nccl, nvlink, or nvlink:N[:S] (at most N CTAs per call, S of them sending; 0 = default)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--small", action="store_true", help="CPU smoke run: --ep (default 4) emulated devices, hidden 256")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    hidden = 256 if args.small else HIDDEN
    experts = 64 if args.small else EXPERTS
    backends = ["xla"] if args.small else args.backends
    if args.small:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.ep or 4}")
        args.loop = min(args.loop, 5)
    if args.ep is not None:
        check_ranks(args.ep, experts)

    # torch first, before JAX takes the GPUs' memory.
    ranks_guess = args.ep
    if ranks_guess is None and not args.small:
        try:
            import torch
            ranks_guess = min(8, torch.cuda.device_count())
        except ImportError:
            ranks_guess = None
    peers = {}
    if not args.small and not args.no_torch and ranks_guess and ranks_guess > 1:
        for tokens in args.tokens:
            ids, _ = routing(tokens, ranks_guess, tokens, experts)
            peers[tokens] = torch_peer(row_counts(ids, ranks_guess, tokens, experts), hidden, args.loop)

    import jax
    import jax.numpy as jnp

    from bench_moe_layer import check_ep, commit, publish

    if args.ep is not None:
        check_ep(args.ep)
    ranks = args.ep or min(8, jax.device_count())
    check_ranks(ranks, experts)
    if ranks_guess and ranks != ranks_guess:
        peers = {}
    mesh = jax.make_mesh((ranks,), ("ep",), devices=jax.devices()[:ranks])
    card = f"{ranks}x {jax.devices()[0].device_kind}"
    row_bytes = hidden * 2
    lines, failed = [], []
    for tokens in args.tokens:
        ids, weights = routing(tokens, ranks, tokens, experts)
        counts = row_counts(ids, ranks, tokens, experts)
        off_rank = counts * (1 - np.eye(ranks, dtype=int))
        sent = off_rank.sum(1).max() * row_bytes  # busiest sender
        back = off_rank.sum(0).max() * row_bytes  # combine: rows go back the other way
        inputs = bench_inputs(mesh, ids, weights, tokens, hidden, jnp.bfloat16)
        # The portable xla backend's outputs (tested against NumPy in CI) are what every backend
        # must reproduce before it is timed.
        reference = one_round(make_comm("xla", mesh), mesh, *inputs, experts)
        results = {name: jax_times(name, mesh, inputs, experts, args.loop, args.iters, reference)
                   for name in backends}
        for name in [n for n, t in results.items() if "wrong" in t]:
            print(f"| {tokens} | {name} | not timed: its outputs differ from xla's: "
                  f"{', '.join(results.pop(name)['wrong'])} |", flush=True)
            failed.append(f"{name} at {tokens} tokens")
        if peers.get(tokens):
            results["torch nccl (all_to_all_single)"] = peers[tokens]
        base = results.get("xla")
        for name, t in results.items():
            ratio = "" if base is None or name == "xla" else (
                f"{base['dispatch'] / t['dispatch']:.2f} / {base['combine'] / t['combine']:.2f}")
            kernel = (f"{t['dispatch_kernel']:.1f} / {t['combine_kernel']:.1f} "
                      f"({sent / t['dispatch_kernel'] / 1e3:.0f} / {back / t['combine_kernel'] / 1e3:.0f} GB/s; "
                      f"peers started {t['dispatch_ready']:.1f}; between calls {t['dispatch_gap']:.1f} / "
                      f"{t['combine_gap']:.1f}; start to start {t['dispatch_period']:.1f} / "
                      f"{t['combine_period']:.1f}{stamp_text(t)})" if "dispatch_kernel" in t else "")
            lines.append(f"| {tokens} | {name} | {t['dispatch']:.1f} | {t['combine']:.1f} | "
                         f"{sent / t['dispatch'] / 1e3:.0f} | {back / t['combine'] / 1e3:.0f} | {ratio} | {kernel} |")
            print(lines[-1], flush=True)
        loop_us = loop_only_us(mesh, tokens, hidden, args.loop, args.iters, jnp.bfloat16)
        lines.append(f"| {tokens} | loop only (1-row op) | {loop_us:.1f} | {loop_us:.1f} |  |  |  |  |")
        print(lines[-1], flush=True)

    torch_version = ""
    if any(peers.values()):
        import torch

        torch_version = f" {torch.__version__}"
    text = "\n".join([
        "",
        f"## bench_alltoall: {card}, EP{ranks}, {datetime.date.today()}, commit {commit()}, jax {jax.__version__}",
        "",
        f"Hidden {hidden} bf16, top-{TOP_K} of {experts} experts (uniform), one slot per expert; µs per op "
        f"= (time of one jitted unrolled loop of {2 * args.loop} ops - one of {args.loop}) / {args.loop}, medians "
        f"of {args.iters}, so each run's launch, sync and start skew between GPUs cancel (rows before "
        "2026-11-28's slope rows divided one loop's time by its ops instead); GB/s per GPU = off-rank token "
        "rows (hidden x 2 bytes) of the busiest rank / time; ratio = xla time / this time (dispatch / combine). "
        "Every op's outputs are read through an optimization barrier, and xla's slot and weight inputs "
        "depend on the previous op (two one-element updates per op); earlier rows let XLA run xla's slot/count "
        "and weight all-to-alls once per loop, timing its dispatch as one collective of three. "
        f"torch{torch_version}: NCCL all_to_all_single with the same splits (token rows only), one process "
        "per GPU (CUDA events, eager loop). nvlink kernel: the custom call's own time (device timer, first CTA's start to the last "
        "CTA's end, slowest rank), without the loop's other ops; peers started: of dispatch's kernel time, "
        "how long until every peer had started the call (launch skew plus a round trip; slowest rank); "
        "between calls: the GPU's median idle time from one call's end to the next one's start (slowest rank); "
        "start to start: the median time from one call's start to the next one's inside a run (kernel, gap and "
        "the loop's other ops: µs per op without the slope's run-to-run spread; slowest rank); "
        "stamps (where printed): median µs after the call's start at which the last CTA started, a receiver "
        "had seen every peer's call, the last sender CTA ended, and the call ended (slowest rank; dispatch / "
        "combine). "
        "loop only: the same timing loop around a 1-row op instead of the all-to-all (its cost per op). "
        + (f"XLA_FLAGS: `{os.environ['XLA_FLAGS'].strip()}`." if "xla_gpu" in os.environ.get("XLA_FLAGS", "")
           else ""),
        "",
        "| tokens/rank | backend | dispatch µs | combine µs | dispatch GB/s | combine GB/s | speed-up vs xla "
        "| nvlink kernel µs (dispatch / combine) |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ])
    publish(text, write=not args.no_write and not args.small)
    if failed:
        print(f"bench_alltoall: wrong outputs (not timed): {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
