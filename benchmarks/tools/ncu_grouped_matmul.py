"""One call each of our grouped matmul and its peers, for Nsight Compute to read counters.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        python benchmarks/tools/ncu_grouped_matmul.py [--gemm gate/up|down] [--kinds uniform,zipf] \
        [--configs 'FIELD=VALUE,...;...']

Everything is compiled and warmed up first; only the calls between
``cudaProfilerStart`` and ``cudaProfilerStop`` are profiled: per kind, our
``mosaic_gpu`` kernel (default tiles, or each of ``--configs``) and
``torch._grouped_mm``, then a dense matmul with the same FLOPs (XLA's and
torch's). Needs a CUDA GPU and torch. Timing belongs to bench_grouped_matmul.py;
this script only gives the profiler one clean launch of each.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_grouped_matmul import group_sizes, parse_variants  # noqa: E402
from pallas_kernels import MosaicGpuConfig, grouped_matmul  # noqa: E402

SHAPES = {"gate/up": (7168, 4096), "down": (2048, 7168)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemm", default="gate/up", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--kinds", default="uniform,zipf")
    parser.add_argument("--configs", default="",
                        help="';'-separated MosaicGpuConfig field lists for ours, each profiled, e.g. "
                             "'consumers=pingpong,max_concurrent_steps=6;wg_split=m,tile_m=64,tile_n=256' "
                             "(default: the default tiles)")
    args = parser.parse_args()
    configs = [MosaicGpuConfig(**fields) for fields in parse_variants(args.configs)] or [None]
    labels = [part for part in args.configs.split(";") if part] or ["default tiles"]
    k, n = SHAPES[args.gemm]
    m, g = args.rows, args.groups
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (g, k, n), jnp.bfloat16) * 0.02
    ours = jax.jit(lambda x, w, gs, config: grouped_matmul(x, w, gs, implementation="mosaic_gpu", config=config),
                   static_argnums=3)
    dense = jax.jit(lambda a, b: a @ b)
    ta = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    tb = torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    calls = []
    for kind in args.kinds.split(","):
        sizes = group_sizes(m, g, kind)
        gs = jnp.asarray(sizes)
        offs = torch.tensor(np.cumsum(sizes), device="cuda", dtype=torch.int32)
        for label, config in zip(labels, configs):
            calls.append((f"ours {kind} ({label})",
                          lambda gs=gs, config=config: ours(x, w, gs, config).block_until_ready()))
        calls.append((f"torch._grouped_mm {kind}",
                      lambda offs=offs: torch._grouped_mm(ta, tb, offs=offs, out_dtype=torch.bfloat16)))
    calls.append(("xla dense", lambda: dense(x, w[0]).block_until_ready()))
    calls.append(("torch dense", lambda: ta @ tb[0]))
    for _, fn in calls:  # compile and warm up outside the profiled range
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in calls:
        print(f"profiling: {name}", flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
