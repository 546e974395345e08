"""Where does the nvlink dispatch loop's time go beyond the kernel? Variants at 128 tokens, EP=all GPUs."""
import sys, os
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from bench_alltoall import routing, HIDDEN, EXPERTS
from wideep_jax.bench import median_ms, time_fn
from wideep_jax.comm import ffi_lib, get_alltoall_backend
from wideep_jax.dispatch import make_dispatch_plan

ranks = jax.device_count()
mesh = jax.make_mesh((ranks,), ("ep",))
comm = get_alltoall_backend("nvlink", mesh=mesh, axis="ep")
loops, tok = 50, P("ep")
for tokens in (1, 128, 1024):
    ids, weights = routing(tokens, ranks, tokens, EXPERTS)
    spr = EXPERTS // ranks
    plan_of = lambda s, w: make_dispatch_plan(s, w, jnp.ones(s.shape[:1], bool), num_ranks=ranks, slots_per_rank=spr)

    def with_update(x, s, w):
        plan = plan_of(s, w)
        def step(i, c):
            x, acc = c
            x = x.at[0, 0].add((acc * 0).astype(x.dtype))
            r = comm.dispatch(x, plan, axis_name="ep")
            return x, acc + r.x[0, 0, 0].astype(jnp.float32) + r.count[0]
        return jax.lax.fori_loop(0, loops, step, (x, jnp.float32(0)), unroll=True)[1][None]

    def no_update(x, s, w):
        plan = plan_of(s, w)
        acc = jnp.float32(0)
        for _ in range(loops):
            r = comm.dispatch(x, plan, axis_name="ep")
            acc = acc + r.count[0]
        return acc[None]

    def no_consume(x, s, w):
        plan = plan_of(s, w)
        outs = [comm.dispatch(x, plan, axis_name="ep").count[0] for _ in range(loops)]
        return outs[-1].astype(jnp.float32)[None]

    x = jax.device_put(jax.random.normal(jax.random.key(0), (ranks * tokens, HIDDEN), jnp.bfloat16), NamedSharding(mesh, tok))
    s = jax.device_put(jnp.asarray(ids), NamedSharding(mesh, tok))
    w = jax.device_put(jnp.asarray(weights), NamedSharding(mesh, tok))
    for name, body in (("with x update (bench)", with_update), ("no update, counts consumed", no_update),
                       ("no update, last count only", no_consume)):
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok), out_specs=tok, check_vma=False))
        jax.block_until_ready(f(x, s, w))
        for ws in comm.workspaces:
            for d in mesh.devices.flat:
                ffi_lib.nvlink_profile(ws, d, reset=True)
        t = median_ms(time_fn(lambda: f(x, s, w), iters=5)) / loops * 1e3
        st = [ffi_lib.nvlink_profile(ws, d) for ws in comm.workspaces for d in mesh.devices.flat]
        k = max(v["dispatch_us"] for v in st if v["dispatch_calls"])
        ready = max(v["dispatch_ready_us"] for v in st if v["dispatch_calls"])
        hlo = f.lower(x, s, w).compile().as_text()
        ws = max(comm.workspaces)  # dispatch's workspace (combine is not called here)
        traces = [ffi_lib.nvlink_trace(w_, d, "dispatch") for w_ in comm.workspaces for d in mesh.devices.flat]
        traces = [t_ for t_ in traces if len(t_)]
        for r, tr in enumerate(traces):
            tr = tr.astype(np.int64)
            dur = (tr[:, 1] - tr[:, 0]) / 1e3
            gap = (tr[1:, 0] - tr[:-1, 1]) / 1e3
            print(f"    rank {r}: calls {len(tr)} kernel p50 {np.median(dur):.1f} µs, gap to next call p10/p50/p90 "
                  f"{np.percentile(gap, 10):.1f}/{np.median(gap):.1f}/{np.percentile(gap, 90):.1f} µs, period p50 "
                  f"{np.median(np.diff(tr[:, 0])) / 1e3:.1f}", flush=True)
        if len(traces) > 1:
            n = min(len(t_) for t_ in traces)
            off = (traces[1][-n:, 0].astype(np.int64) - traces[0][-n:, 0].astype(np.int64)) / 1e3
            print(f"    start of rank 1 - rank 0 (globaltimer, if synced): p10/p50/p90 {np.percentile(off, 10):.1f}/"
                  f"{np.median(off):.1f}/{np.percentile(off, 90):.1f} µs", flush=True)
        print(f"tokens {tokens:5d} | {name:28s} | loop {t:7.1f} µs/op | kernel {k:6.1f} | peers started {ready:5.1f} | "
              f"fusions {hlo.count('fusion(')} copies {hlo.count(' copy(')} custom-calls {hlo.count('custom-call(')}", flush=True)
