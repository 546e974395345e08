"""Permute and combine of the expert path against the card's copy bandwidth.

    python benchmarks/bench_permute.py          # GPU: DeepSeek-V3 rows per EP rank
    python benchmarks/bench_permute.py --small  # CPU smoke run of the same code
    python benchmarks/bench_permute.py --tokens 16384 --iters 10

Times the three memory-bound steps of `wideep_jax.experts` around the grouped
GEMMs, each jitted alone: `sort_pairs` (the plan), `permute_rows` (token rows
into slot-sorted order, one copy per (token, k) pair; XLA's gather) and
`combine_rows` (each token's sum over its pairs' expert outputs), and on GPU the
Pallas kernels of `pallas_kernels.permute` for the last two. Each step runs
`--loop` and twice as many times in one jitted program (`wideep_jax.bench.device_loop`)
and the time per call is the slope (`seconds_per_call`), so decode sizes are timed
by the device, not by the host's dispatch or each run's fixed costs. Bandwidth counts the bytes each
must read and write (rows read + rows written), against a measured device copy
(read + write of a 2 GiB buffer). Appends to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_grouped_matmul import copy_bandwidth  # noqa: E402
from bench_moe_layer import commit, publish  # noqa: E402
from wideep_jax.bench import device_loop, positive_int, seconds_per_call  # noqa: E402
from pallas_kernels import permute as pallas_permute  # noqa: E402
from wideep_jax.experts import combine_rows, permute_rows, sort_pairs  # noqa: E402


def routing(rng, tokens: int, top_k: int, slots: int, skew: float):
    """Distinct slots per token, popularity ~ 1/rank^skew; weights sum to 1."""
    p = 1.0 / np.arange(1, slots + 1) ** skew
    p = rng.permutation(p / p.sum())
    slot = np.stack([rng.choice(slots, top_k, replace=False, p=p) for _ in range(tokens)])
    weight = rng.random((tokens, top_k)).astype(np.float32)
    return jnp.asarray(slot, jnp.int32), jnp.asarray(weight / weight.sum(1, keepdims=True))


@jax.jit
def same(a, b) -> jax.Array:
    """Whether two arrays are equal, computed on the device."""
    return jnp.array_equal(a, b)


@functools.partial(jax.jit, static_argnums=(2, 3))
def close(a, b, rtol: float, atol: float) -> jax.Array:
    """``np.allclose`` of two arrays in float32, computed on the device."""
    return jnp.allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=rtol, atol=atol)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=positive_int, default=20)
    parser.add_argument("--loop", type=positive_int, default=20, help="calls per timed sample, in one jitted program")
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=None,
                        help="token counts (default 128 1024 4096 16384; --small: 64 512)")
    parser.add_argument("--small", action="store_true", help="CPU smoke dims")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    hidden, top_k, slots = (256, 4, 16) if args.small else (7168, 8, 64)
    token_counts = args.tokens or ((64, 512) if args.small else (128, 1024, 4096, 16384))
    dtype = jnp.bfloat16
    item = jnp.dtype(dtype).itemsize
    bandwidth = copy_bandwidth(args.iters)
    plan = jax.jit(lambda s, w, v: sort_pairs(s, w, v, slots))
    permute = jax.jit(lambda x, pairs: permute_rows(x, pairs, implementation="xla"))
    combine = jax.jit(lambda out, pairs: combine_rows(out, pairs, dtype))
    lines = []
    for tokens in token_counts:
        slot, weight = routing(rng, tokens, top_k, slots, 1.2)
        valid = jnp.ones((tokens,), bool)
        x = jax.random.normal(jax.random.key(0), (tokens, hidden), jnp.float32).astype(dtype)
        pairs = plan(slot, weight, valid)
        rows = permute(x, pairs)
        # The checks run on the device: at 16384 tokens the rows are 1.9 GB of bf16, which took
        # the host most of a minute to copy and compare (twice, with the Pallas gather's check).
        step = max(1, tokens * top_k // 512)  # against NumPy: about 512 rows, as bits
        np.testing.assert_array_equal(np.asarray(rows[::step]).view(np.uint16),
                                      np.asarray(x)[np.asarray(pairs.row_token)[::step]].view(np.uint16))
        assert same(rows, x[pairs.row_token]), "permute_rows is wrong"
        out = rows  # any [N*K, H] rows: combine's cost does not depend on values
        got = combine(out, pairs)
        assert close(got, x * top_k, 2e-2, 1e-2), "combine is wrong"
        pair_bytes = tokens * top_k * hidden * item
        # name: (function, its arguments, the argument each call perturbs, bytes moved)
        steps = {
            # What chaining the calls costs by itself: a 1-row op in the same loop.
            "loop only (1-row op)": (lambda x: x[:1] + 1, (x,), 0, None),
            "sort_pairs (plan)": (lambda s, w, v: sort_pairs(s, w, v, slots), (slot, weight, valid), 0, None),
            "permute_rows": (lambda x, p: permute_rows(x, p, implementation="xla"), (x, pairs), 0,
                             2 * pair_bytes),
            "combine_rows": (lambda o, p: combine_rows(o, p, dtype), (out, pairs), 0,
                             pair_bytes + tokens * hidden * item),
        }
        if jax.default_backend() == "gpu":  # the Pallas (Triton) kernels, same bytes
            gather = jax.jit(pallas_permute.gather_rows)
            reduce = jax.jit(lambda y, p, v: pallas_permute.combine_rows(y, p, v, out_dtype=dtype))
            assert same(gather(x, pairs.row_token), rows), "pallas gather_rows is wrong"
            assert close(reduce(out, pairs.position, pairs.pair_valid), got, 1e-2, 1e-2), \
                "pallas combine_rows is wrong"
            steps["pallas gather_rows"] = (pallas_permute.gather_rows, (x, pairs.row_token), 0, 2 * pair_bytes)
            steps["pallas combine_rows"] = (
                lambda y, p, v: pallas_permute.combine_rows(y, p, v, out_dtype=dtype),
                (out, pairs.position, pairs.pair_valid), 0, pair_bytes + tokens * hidden * item)
        for name, (fn, fn_args, perturb, nbytes) in steps.items():
            def build(n, fn=fn, fn_args=fn_args, perturb=perturb):
                looped = device_loop(fn, n, perturb)
                return lambda: looped(*fn_args)

            ms = seconds_per_call(build, args.loop, iters=args.iters) * 1e3
            rate = "" if nbytes is None else f"{nbytes / (ms / 1e3) / 1e9:.0f}"
            share = "" if nbytes is None else f"{nbytes / (ms / 1e3) / 1e9 / bandwidth:.2f}"
            lines.append(f"| {tokens} | {name} | {ms * 1e3:.1f} | {rate} | {share} |")
            print("  " + lines[-1], flush=True)

    card = jax.devices()[0].device_kind
    title = (f"## bench_permute: 1x {card}, {datetime.date.today()}, commit {commit()}, "
             f"jax {jax.__version__}")
    notes = (f"hidden {hidden}, top-{top_k} of {slots} local slots (Zipf 1.2), bf16; XLA gathers and the Pallas kernels of pallas_kernels/permute.py; "
             f"bytes = rows read + rows written; measured copy bandwidth {bandwidth:.0f} GB/s; "
             f"(time of {2 * args.loop} calls in one jitted program - time of {args.loop}) / {args.loop}, medians "
             f"of {args.iters}, so each run's launch and sync cancel (each call also "
             f"updates and reads one element, to chain the calls; 'loop only' is that cost alone).")
    table = "\n".join(["| tokens | step | µs | GB/s | of copy |", "|---|---|---|---|---|"] + lines)
    publish(f"\n{title}\n\n{notes}\n\n{table}\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
