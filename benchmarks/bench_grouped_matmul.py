"""Grouped matmul: ours against its peers, prefill and decode shapes, one process, one card.

    python benchmarks/bench_grouped_matmul.py          # GPU: DeepSeek-V3 per-rank shapes at EP4
    python benchmarks/bench_grouped_matmul.py --small  # CPU smoke run of the same code

Ours: the ``mosaic_gpu`` and ``triton`` Pallas kernels (each the best of a small
tile sweep; default tiles first) and the ``xla`` loop. Peers, each where it is
available: ``torch._grouped_mm`` (torch with CUDA), JAX's ``ragged_dot_mgpu``
Pallas kernel (Hopper; best of a small tile sweep), ``jax.lax.ragged_dot``, and a
dense XLA matmul with the same FLOPs. A case's rows (each sweep's winner and
the peers) are timed in turns, one sample each per round: the card's clocks
drift with its recent load, by up to 15 % within one process. Fused rows time
gate/up with the SwiGLU epilogue and down with the routing-weight row scale,
against torch doing the same with ``_grouped_mm`` plus its elementwise ops. Prefill rows report TFLOP/s
over the real rows; decode rows report GB/s over the weight bytes of the groups
that have rows (a group with no rows need not be read), next to the card's
measured copy bandwidth. ``--phase wgrad`` times the weight gradient (per-group
``x^T @ dy``, prefill shapes): the ``triton`` transposed kernel (``tgmm``, a small
tile sweep; both Pallas implementations' dW), the Mosaic GPU transposed kernel
(``mosaic_gpu_tgmm``, opt-in, a small sweep) and the ``xla`` loop, against
torch's ``_grouped_mm`` with offsets along the contraction, JAX's
``transposed_ragged_dot_mgpu`` Pallas kernel (best of a small tile sweep) and a
dense matmul with the same FLOPs. Before it is timed, every candidate of ours and of
JAX's Pallas peers is checked against a float32 reference (`forward_check`: sampled
rows of every non-empty group; `wgrad_check`: a dW block of the largest, the smallest
and an empty group) and skipped, with the error printed, if it is off by more than
CHECK_TOLERANCE. Appends a table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_moe_layer import commit, publish  # noqa: E402
from pallas_kernels import (MosaicGpuConfig, MosaicTgmmConfig, TritonConfig, grouped_matmul,  # noqa: E402
                            grouped_matmul_transposed, grouped_swiglu)
from pallas_kernels.grouped_matmul import default_implementation  # noqa: E402
from pallas_kernels.grouped_matmul import mosaic_gpu as mosaic_module  # noqa: E402
from pallas_kernels.grouped_matmul import mosaic_gpu_tgmm as mosaic_tgmm_module  # noqa: E402
from pallas_kernels.grouped_matmul import triton as triton_module  # noqa: E402
from wideep_jax import bench  # noqa: E402
from wideep_jax.bench import Sampler, copy_rate, race, time_fn  # noqa: E402

def group_sizes(num_rows: int, num_groups: int, kind: str) -> np.ndarray:
    """int32 [G] summing to ``num_rows``: ``uniform`` (equal +-1), ``zipf`` (popularity ~ 1/rank^1.2)
    or ``zipf-aligned`` (a diagnostic: Zipf sizes rounded to whole 128-row tiles, so no tile
    straddles two groups; the difference to ``zipf`` is what partial tiles cost)."""
    if kind not in ("uniform", "zipf", "zipf-aligned"):
        raise ValueError(f"group-size kind {kind!r}: allowed uniform, zipf, zipf-aligned")
    if kind == "uniform":
        sizes = np.full(num_groups, num_rows // num_groups)
        sizes[: num_rows % num_groups] += 1
    else:
        # One draw per shape, whatever ran before, so zipf and zipf-aligned compare the same skew.
        draw = np.random.default_rng([num_rows, num_groups])
        p = 1.0 / np.arange(1, num_groups + 1) ** 1.2
        sizes = draw.multinomial(num_rows, draw.permutation(p / p.sum()))
        if kind == "zipf-aligned":
            sizes = np.round(sizes / 128).astype(np.int64) * 128
            sizes[np.argmax(sizes)] += num_rows - sizes.sum()  # still sums to num_rows (a multiple of 128)
    return sizes.astype(np.int32)


BATCH = 1  # back-to-back calls per timed sample (set by --batch)
SUSTAIN_S = 0.0  # seconds each sample first runs its entry back to back (set by --sustain)
EXTRA_WIDTHS: tuple[int, ...] = ()  # more planar-snake band widths for the prefill defaults (--widths)
VARIANTS: tuple[dict, ...] = ()  # field replacements tried on every mosaic_gpu candidate (--variants)
DEFAULTS_ONLY = False  # the mosaic_gpu sweep is the default tiles (and their --variants) only


def parse_variants(text: str, config_type=MosaicGpuConfig) -> tuple[dict, ...]:
    """``"delay_release=1;tile_k=128,max_concurrent_steps=3"`` -> one dict per variant
    (fields of ``config_type``: MosaicTgmmConfig for ``--phase wgrad``)."""
    fields = {f.name for f in dataclasses.fields(config_type)}
    variants = []
    for part in filter(None, text.split(";")):
        variant = {}
        for item in part.split(","):
            name, _, value = item.partition("=")
            if name not in fields or not value:
                raise SystemExit(f"--variants {text!r}: {item!r} is not FIELD=VALUE with FIELD one of "
                                 f"{sorted(fields)}")
            variant[name] = (value == "True") if value in ("True", "False") else (
                int(value) if value.lstrip("-").isdigit() else value)
        variants.append(variant)
    return tuple(variants)


def sampler(run: Callable[[int], None]) -> Sampler:
    """`wideep_jax.bench.sampler` with this run's ``--batch`` and ``--sustain``."""
    return bench.sampler(run, batch=BATCH, sustain_s=SUSTAIN_S)


def jax_sampler(fn) -> Sampler:
    return bench.jax_sampler(fn, batch=BATCH, sustain_s=SUSTAIN_S)


def pick(candidates: dict, iters: int, check: OutputCheck | None = None) -> tuple[str, Sampler] | None:
    """The fastest of some zero-argument jax callables, as ``(label, sampler)``, after
    compiling each; failing ones, and with ``check`` ones whose output it refuses, are
    skipped (None if all are)."""
    live = {}
    for label, fn in candidates.items():
        try:
            time_fn(fn, iters=1, warmup=2)  # compiles
        except Exception as err:  # a tile that does not fit is not a result
            print(f"    skip {label}: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)
            continue
        if check is not None:
            error = check.error(fn())
            if not error <= CHECK_TOLERANCE:  # NaN fails too
                print(f"    skip {label or 'default'}: wrong output ({check.what}: relative error {error:.3g} "
                      f"> {CHECK_TOLERANCE:g})", flush=True)
                continue
        live[label] = jax_sampler(fn)
    if len(live) <= 1:
        return next(iter(live.items()), None)
    times = race(live, iters)
    for label, ms in times.items():
        print(f"    {label or 'default'}: {ms:.3f} ms", flush=True)
    best = min(times, key=times.get)
    return best, live[best]


CHECK_TOLERANCE = 1e-2  # bf16 operands and output against a float32 reference (the bound)


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """Part of a candidate's output against a float32 reference: a fast kernel that
    computes something else is not a result. ``pick`` times only candidates whose
    ``error`` (max |got - want| / max |want| over the checked part) is <= CHECK_TOLERANCE."""

    what: str
    index: tuple  # numpy index of the checked part of the output
    want: np.ndarray  # float32

    def error(self, out) -> float:
        got = np.asarray(jax.device_get(out[self.index]), np.float32)
        if got.shape != self.want.shape:
            return float("inf")
        return float(np.abs(got - self.want).max() / max(float(np.abs(self.want).max()), 1e-30))


def forward_check(x, w, sizes: np.ndarray, epilogue: str, row_scale=None, per_group: int = 4) -> OutputCheck:
    """Rows of every non-empty group (its first, its last and a few drawn between) against
    ``jax.lax.ragged_dot`` with a float32 result (bf16 products are exact in float32) and
    the epilogue applied in float32; padding rows are not checked (unspecified)."""
    rng = np.random.default_rng(1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows, counts = [], []
    for start, size in zip(starts, sizes):
        chosen = np.unique(np.concatenate([[0, size - 1], rng.integers(0, size, per_group)])) if size else []
        rows.append(start + np.asarray(chosen, np.int64))
        counts.append(len(chosen))
    rows = np.concatenate(rows)
    want = jax.lax.ragged_dot(x[rows], w, jnp.asarray(counts, jnp.int32), preferred_element_type=jnp.float32)
    if epilogue == "swiglu":
        half = want.shape[1] // 2
        want = jax.nn.silu(want[:, :half]) * want[:, half:]
    elif row_scale is not None:
        want = want * row_scale[rows].astype(jnp.float32)[:, None]
    return OutputCheck(f"{len(rows)} rows of {int((sizes > 0).sum())} groups", (rows,), np.asarray(want))


def wgrad_check(x, dy, sizes: np.ndarray, block: int = 64) -> OutputCheck:
    """One ``block x block`` corner of dW for the largest, the smallest non-empty and an
    empty group (all zeros: no rows), where they exist, against float32 ``x_g^T dy_g``."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    live = np.flatnonzero(sizes)
    groups = [int(live[np.argmax(sizes[live])]), int(live[np.argmin(sizes[live])])]
    groups += [int(g) for g in np.flatnonzero(sizes == 0)[:1]]
    kb, nb = min(block, x.shape[1]), min(block, dy.shape[1])
    want = np.stack([np.asarray(x[starts[g]:starts[g] + sizes[g], :kb].astype(jnp.float32).T
                                @ dy[starts[g]:starts[g] + sizes[g], :nb].astype(jnp.float32)) for g in groups])
    return OutputCheck(f"dW[{kb}x{nb}] of groups {groups}", (np.asarray(groups), slice(0, kb), slice(0, nb)), want)


def timed(entries: dict[str, tuple[str, Sampler] | None], iters: int) -> dict[str, tuple[str, float]]:
    """``{name: (label, ms)}`` for the entries that exist, all raced together."""
    entries = {name: entry for name, entry in entries.items() if entry is not None}
    times = race({name: sample for name, (_, sample) in entries.items()}, iters)
    return {name: (entries[name][0], times[name]) for name in entries}


def mosaic_sweep(m, g, k, n_out, epilogue) -> list:
    """Default tiles first, then a few measured contenders (prefill or decode)."""
    default = mosaic_module.default_config(m, g, k=k, n_out=n_out, epilogue=epilogue)
    walk = dict(grid_minor="m", grid_tile_width=4)
    pingpong = dict(consumers="pingpong", **walk)
    pingpong_cols = dict(consumers="pingpong", grid_minor="n", grid_tile_width=4)  # column tiles fastest
    if m // g >= 128:
        if epilogue == "swiglu":
            more = [MosaicGpuConfig(tile_m=64, tile_n=128, wg_split="m", max_concurrent_steps=4,
                                    chain_items=True, **walk),
                    MosaicGpuConfig(tile_m=64, tile_n=128, wg_split="m", max_concurrent_steps=3,
                                    swizzled_epilogue=True, **walk),
                    MosaicGpuConfig(tile_m=128, tile_n=64, max_concurrent_steps=6, **pingpong),
                    MosaicGpuConfig(tile_m=128, tile_n=64, max_concurrent_steps=6, **pingpong_cols)]
        else:
            more = [MosaicGpuConfig(chain_items=True, **walk), MosaicGpuConfig(tile_m=64, tile_n=256, wg_split="m", **walk),
                    MosaicGpuConfig(tile_m=64, tile_n=256, wg_split="m", chain_items=True, **walk),
                    MosaicGpuConfig(swizzled_epilogue=True, max_concurrent_steps=3, **walk),
                    MosaicGpuConfig(tile_m=64, tile_n=256, wg_split="m", swizzled_epilogue=True,
                                    max_concurrent_steps=3, **walk),
                    MosaicGpuConfig(tile_m=128, tile_n=128, max_concurrent_steps=6, **pingpong),
                    MosaicGpuConfig(tile_m=128, tile_n=128, max_concurrent_steps=6, **pingpong_cols)]
    else:
        more = [MosaicGpuConfig(tile_m=64, tile_n=64, max_concurrent_steps=8),
                MosaicGpuConfig(tile_m=64, tile_n=256, max_concurrent_steps=2),
                MosaicGpuConfig(tile_m=64, tile_n=128, max_concurrent_steps=4, chain_items=True),
                MosaicGpuConfig(tile_m=64, tile_n=128 if epilogue == "swiglu" else 256, max_concurrent_steps=4,
                                consumers="pingpong")]
    if m // g >= 128:  # the default tiles walked in other bands (row tiles sharing a weight tile)
        more += [dataclasses.replace(default, grid_tile_width=width) for width in EXTRA_WIDTHS]
    return candidates(default, more)


def candidates(default, more: list) -> list:
    """``default``, then ``more`` (none with ``--defaults-only``), then each of them again
    with every ``--variants`` replacement (new ones only)."""
    configs = [default] + ([] if DEFAULTS_ONLY else [c for c in more if c != default])
    for fields in VARIANTS:
        for config in list(configs):
            try:
                variant = dataclasses.replace(config, **fields)
            except ValueError:  # a combination the kernel does not take (e.g. chained + delayed)
                continue
            if variant not in configs:
                configs.append(variant)
    return configs


def triton_sweep(m, g, k, n_out, epilogue) -> list:
    default = triton_module.default_config(m, g, k=k, n_out=n_out, epilogue=epilogue)
    more = ([TritonConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
             TritonConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)]
            if m // g >= 128 else
            [TritonConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4),
             TritonConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=5)])
    return [default] + [c for c in more if c != default]


def short(config) -> str:
    """A config's fields that differ from the class defaults."""
    fields = type(config).__dataclass_fields__
    return " ".join(f"{name}={getattr(config, name)}" for name, f in fields.items()
                    if getattr(config, name) != f.default) or "defaults"


def ours(x, w, gs, epilogue, iters, on_gpu, row_scale=None, quick=False,
         check: OutputCheck | None = None) -> dict[str, tuple[str, Sampler] | None]:
    m, k = x.shape
    g, n = w.shape[0], w.shape[2] // (2 if epilogue == "swiglu" else 1)
    call = (functools.partial(grouped_swiglu) if epilogue == "swiglu"
            else functools.partial(grouped_matmul, row_scale=row_scale))
    sweeps = {"xla loop": [None]}
    if on_gpu:
        sweeps = {"mosaic_gpu": mosaic_sweep(m, g, k, n, epilogue), "triton": triton_sweep(m, g, k, n, epilogue),
                  **sweeps}
        if quick:
            sweeps = {"mosaic_gpu": sweeps["mosaic_gpu"]}
    out = {}
    for impl, configs in sweeps.items():
        candidates = {}
        for config in configs:
            name = "xla" if impl == "xla loop" else impl
            f = jax.jit(functools.partial(call, implementation=name, config=config))
            candidates["default" if config is None else short(config)] = functools.partial(f, x, w, gs)
        out[impl] = pick(candidates, iters, check)
    return out


def jax_peers(x, w, sizes, iters: int, on_gpu: bool, quick: bool = False, mgpu: bool = False,
              check: OutputCheck | None = None) -> dict[str, tuple[str, Sampler] | None]:
    gs = jnp.asarray(sizes)
    out = {}
    ragged = jax.jit(jax.lax.ragged_dot)
    if not quick:
        out["lax.ragged_dot"] = pick({"": functools.partial(ragged, x, w, gs)}, iters)
    if on_gpu and (mgpu or not quick):
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
        except ImportError as err:
            print(f"    no ragged_dot_mgpu: {err}")
        else:
            sweep = {}
            for bm, bn, steps, grid_n in ((128, 128, 4, 1), (128, 256, 4, 1), (128, 128, 4, 4),
                                          (64, 256, 4, 2), (128, 192, 5, 1)):
                if w.shape[2] % (bn * grid_n):
                    continue
                f = jax.jit(functools.partial(ragged_dot_mgpu.ragged_dot, block_m=bm, block_n=bn, block_k=64,
                                              max_concurrent_steps=steps, grid_block_n=grid_n))
                sweep[f"bm={bm} bn={bn} steps={steps} grid_n={grid_n}"] = functools.partial(
                    lambda f: f(x, w, group_sizes=gs), f)
            out["ragged_dot_mgpu"] = pick(sweep, iters, check)
    rows = int(sizes.sum())
    dense = jax.jit(lambda a, b: a @ b)
    xd = x[:rows]
    out["dense (same FLOPs)"] = pick({"": functools.partial(dense, xd, w[0])}, iters)
    return out


def cuda_torch():
    """torch, where it has CUDA and ``_grouped_mm``; else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    return torch


def torch_sampler(torch, fn) -> tuple[str, Sampler]:
    """``("", sampler)`` of ``fn`` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()

    def run(calls: int) -> None:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    return "", sampler(run)


def torch_peer(m, k, n, sizes, epilogue: str = "none"):
    torch = cuda_torch()
    if torch is None:
        return None
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    # _grouped_mm wants the weight's last dim contiguous as [G, N, K] transposed.
    b = torch.randn(len(sizes), n, k, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    offs = torch.tensor(np.cumsum(sizes), device="cuda", dtype=torch.int32)
    scale = torch.rand(m, 1, device="cuda", dtype=torch.bfloat16)

    def fn():
        y = torch._grouped_mm(a, b, offs=offs, out_dtype=torch.bfloat16)
        if epilogue == "swiglu":
            gate, up = y.chunk(2, dim=-1)
            y = torch.nn.functional.silu(gate) * up
        elif epilogue == "row_scale":
            y = y * scale
        return y

    return torch_sampler(torch, fn)


def wgrad_ours(x, dy, gs, iters: int, on_gpu: bool,
               check: OutputCheck | None = None) -> dict[str, tuple[str, Sampler] | None]:
    """Weight gradient: the XLA loop, the Triton tgmm sweep (the Pallas backends' dW) and the
    Mosaic GPU tgmm sweep."""
    m, k = x.shape
    g, n = gs.shape[0], dy.shape[1]
    loop = jax.jit(functools.partial(grouped_matmul_transposed, implementation="xla"))
    out = {"xla loop": pick({"default": functools.partial(loop, x, dy, gs)}, iters, check)}
    if on_gpu:
        default = triton_module.default_tgmm_config(m, g, k=k, n=n)
        configs = [default] + [c for c in (
            TritonConfig(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=4),
            TritonConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
            TritonConfig(block_m=64, block_n=256, block_k=128, num_warps=8, num_stages=3)) if c != default]
        candidates = {}
        for config in configs:
            f = jax.jit(functools.partial(triton_module.tgmm, num_groups=g, config=config))
            candidates[short(config)] = functools.partial(f, x, dy, gs)
        out["triton tgmm"] = pick(candidates, iters, check)
        # The mosaic_gpu dW (its default config first).
        candidates = {}
        default = mosaic_tgmm_module.default_config(k, n)
        pingpong = dict(consumers="pingpong")
        more = [MosaicTgmmConfig(), MosaicTgmmConfig(tile_k=64, max_concurrent_steps=4),
                MosaicTgmmConfig(tile_n=64, max_concurrent_steps=4), MosaicTgmmConfig(grid_tile_width=8),
                *(MosaicTgmmConfig(max_concurrent_steps=steps, **pingpong) for steps in (4, 5, 6)),
                MosaicTgmmConfig(grid_tile_width=8, max_concurrent_steps=5, **pingpong),
                MosaicTgmmConfig(block_rows=128, max_concurrent_steps=3, **pingpong)]
        for config in candidates(default, more):
            f = jax.jit(functools.partial(grouped_matmul_transposed, implementation="mosaic_gpu", config=config))
            candidates[short(config)] = functools.partial(f, x, dy, gs)
        out["mosaic_gpu tgmm"] = pick(candidates, iters, check)
        out["transposed_ragged_dot_mgpu"] = transposed_ragged_dot_mgpu_peer(x, dy, gs, iters, check)
    dense = jax.jit(lambda a, b: a.T @ b)
    out["dense (same FLOPs)"] = pick({"": functools.partial(dense, x, dy)}, iters)
    return out


def transposed_ragged_dot_mgpu_peer(x, dy, gs, iters: int,
                                    check: OutputCheck | None = None) -> tuple[str, Sampler] | None:
    """JAX's own Mosaic GPU weight-gradient kernel (x is its lhs as is), best of a few tiles."""
    try:
        from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    except ImportError as err:
        print(f"    no transposed_ragged_dot_mgpu: {err}", flush=True)
        return None
    k, n = x.shape[1], dy.shape[1]
    sweep = {}
    for bm, bn, bk, steps, grid_n in ((128, 128, 64, 4, 1), (128, 256, 64, 3, 1), (64, 256, 64, 4, 2),
                                      (128, 128, 128, 3, 4)):
        if k % bm or n % bn:
            continue
        f = jax.jit(functools.partial(transposed_ragged_dot_mgpu.transposed_ragged_dot, block_m=bm, block_n=bn,
                                      block_k=bk, max_concurrent_steps=steps, grid_block_n=grid_n))
        sweep[f"bm={bm} bn={bn} bk={bk} steps={steps} grid_n={grid_n}"] = functools.partial(
            lambda f: f(x, dy, group_sizes=gs), f)
    if not sweep:
        return None
    return pick(sweep, iters, check)


def wgrad_torch_peer(m, k, n, sizes):
    """torch._grouped_mm with offsets along the contraction: dw[g] = x_g^T @ dy_g."""
    torch = cuda_torch()
    if torch is None:
        return None
    if any(int(s) % 16 for s in sizes):
        # Offsets along the contraction feed TMA descriptors: a misaligned one faults
        # on the device, which poisons the CUDA context for the rest of the process.
        print("    skip torch wgrad: its offsets along K must be multiples of 16; these group sizes are not",
              flush=True)
        return None
    x_t = torch.randn(k, m, device="cuda", dtype=torch.bfloat16)  # x^T, rows of K contiguous in M
    dy = torch.randn(n, m, device="cuda", dtype=torch.bfloat16).t()  # [M, N], column-major
    offs = torch.tensor(np.cumsum(sizes), device="cuda", dtype=torch.int32)

    def fn():
        return torch._grouped_mm(x_t, dy, offs=offs, out_dtype=torch.bfloat16)

    try:
        return torch_sampler(torch, fn)
    except Exception as err:  # a layout this torch build does not take is not a result
        print(f"    skip torch wgrad: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)
        return None


def copy_bandwidth(iters: int) -> float:
    """Measured device copy rate, GB/s (read + write)."""
    return copy_rate(iters, batch=BATCH) / 1e9


MODEL_DIMS = {  # name: (groups, prefill rows, decode rows, {GEMM: (K, N)})
    "deepseek_v3": (64, 32768, (128, 256, 512, 1024), {"gate/up": (7168, 4096), "down": (2048, 7168)}),
    "llama4_maverick": (128, 4096, (128, 256, 512, 1024), {"gate/up": (5120, 16384), "down": (8192, 5120)}),
}

CASES = {  # name: (k index into shapes, epilogue)
    "gate/up": ("gate/up", "none"),
    "down": ("down", "none"),
    "gate/up + SwiGLU": ("gate/up", "swiglu"),
    "down x weight": ("down", "row_scale"),
}


def wgrad_case(name, shape, rows, groups, kind, rng, iters, on_gpu) -> list[str]:
    """Table lines for one weight-gradient case: dw [G, K, N] from x [M, K] and dy [M, N]."""
    k, n = shape
    sizes = group_sizes(rows, groups, kind)
    x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(1), (rows, n), jnp.float32).astype(jnp.bfloat16)
    print(f"{name} rows={rows} {kind}", flush=True)
    entries = wgrad_ours(x, dy, jnp.asarray(sizes), iters, on_gpu, wgrad_check(x, dy, sizes))
    entries["torch._grouped_mm"] = wgrad_torch_peer(rows, k, n, sizes) if on_gpu else None
    results = timed(entries, iters)
    flops = 2.0 * rows * k * n
    torch_ms = results.get("torch._grouped_mm", (0, None))[1]
    mgpu_ms = results.get("transposed_ragged_dot_mgpu", (0, None))[1]  # the "vs ragged_dot_mgpu" column
    dense_ms = results["dense (same FLOPs)"][1]
    lines = []
    for impl, (label, ms) in results.items():
        ratios = " | ".join("" if b is None or not np.isfinite(ms) else f"{b / ms:.2f}"
                            for b in (torch_ms, mgpu_ms, dense_ms))
        lines.append(f"| {name} | {rows} | {kind} | {impl} | {label} | {ms:.3f} | "
                     f"{flops / (ms / 1e3) / 1e12:.0f} TFLOP/s | {ratios} |")
        print("  " + lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="CPU smoke dims")
    parser.add_argument("--phase", choices=("prefill", "decode", "wgrad", "all"), default="all",
                        help="all = prefill and decode; wgrad = the weight gradient at prefill shapes")
    parser.add_argument("--batch", type=int, default=5, help="back-to-back calls per timed sample")
    parser.add_argument("--only", default="", help="comma-separated substrings of 'GEMM rows groups' to run ("
                        "'_' stands for a space, e.g. gate/up_dW_32768_zipf)")
    parser.add_argument("--quick", action="store_true",
                        help="tuning run: only the mosaic_gpu sweep, torch and dense (no triton, XLA loop, "
                             "lax.ragged_dot or ragged_dot_mgpu)")
    parser.add_argument("--mgpu", action="store_true",
                        help="with --quick: also time JAX's ragged_dot_mgpu (its tile sweep), the issue's peer")
    parser.add_argument("--kinds", default="uniform,zipf",
                        help="prefill group-size kinds (uniform, zipf, zipf-aligned)")
    parser.add_argument("--widths", default="",
                        help="comma-separated extra grid_tile_width values tried with the prefill default tiles")
    parser.add_argument("--variants", default="",
                        help="';'-separated FIELD=VALUE[,FIELD=VALUE] replacements of MosaicGpuConfig fields "
                             "(MosaicTgmmConfig with --phase wgrad), each tried on every mosaic_gpu candidate, "
                             "e.g. 'delay_release=1;max_concurrent_steps=3'")
    parser.add_argument("--defaults-only", action="store_true",
                        help="mosaic_gpu (and its dW): time only the default tiles and their --variants, no sweep")
    parser.add_argument("--sustain", type=float, default=0.0,
                        help="seconds each timed sample first runs its entry back to back, so that every "
                             "entry is timed at its own steady clock under the card's power cap")
    parser.add_argument("--model", choices=sorted(MODEL_DIMS), default="deepseek_v3",
                        help="whose per-GPU expert GEMMs: deepseek_v3 = 64 of its 256 experts (EP4), "
                             "llama4_maverick = all 128 experts on one GPU, a 4096-token top-1 prefill")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    global BATCH, EXTRA_WIDTHS, VARIANTS, SUSTAIN_S, DEFAULTS_ONLY
    if args.sustain < 0:
        raise SystemExit(f"--sustain {args.sustain}: must be >= 0 seconds")
    SUSTAIN_S = args.sustain
    VARIANTS = parse_variants(args.variants, MosaicTgmmConfig if args.phase == "wgrad" else MosaicGpuConfig)
    DEFAULTS_ONLY = args.defaults_only
    BATCH = args.batch
    EXTRA_WIDTHS = tuple(int(w) for w in args.widths.split(",") if w)
    on_gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    if args.small:
        groups, prefill_rows, decode_rows = 8, 1024, (32, 64)
        shapes = {"gate/up": (256, 512), "down": (256, 256)}
    else:
        groups, prefill_rows, decode_rows, shapes = MODEL_DIMS[args.model]
    dtype = jnp.bfloat16
    bandwidth = copy_bandwidth(args.iters)
    cases = []
    if args.phase in ("prefill", "all"):
        cases += [(name, prefill_rows, kind) for name in CASES for kind in args.kinds.split(",")]
    if args.phase in ("decode", "all"):
        cases += [("gate/up", rows, "uniform") for rows in decode_rows]
        cases += [("down", rows, "uniform") for rows in decode_rows[::2]]
        cases += [("gate/up + SwiGLU", decode_rows[-2], "zipf"), ("down x weight", decode_rows[-2], "zipf")]
    if args.phase == "wgrad":
        cases = [(f"{name} dW", prefill_rows, kind) for name in ("gate/up", "down") for kind in ("uniform", "zipf")]
    if args.only:
        wanted = [part.replace("_", " ") for part in args.only.split(",")]
        cases = [c for c in cases if any(part in f"{c[0]} {c[1]} {c[2]}" for part in wanted)]
    lines = []
    for name, rows, kind in cases:
        if name.endswith(" dW"):
            lines += wgrad_case(name, shapes[name[:-3]], rows, groups, kind, rng, args.iters, on_gpu)
            continue
        shape, epilogue = CASES[name]
        k, n = shapes[shape]
        sizes = group_sizes(rows, groups, kind)
        x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32).astype(dtype)
        # Drawn in the weight dtype: a float32 draw of Maverick's 128 x 5120 x 16384 needs 40 GiB more.
        w = jax.random.normal(jax.random.key(1), (groups, k, n), dtype) * jnp.asarray(1 / np.sqrt(k), dtype)
        gs = jnp.asarray(sizes)
        print(f"{name} rows={rows} {kind}", flush=True)
        row_scale = jnp.ones((rows,), jnp.float32) if epilogue == "row_scale" else None
        check = forward_check(x, w, sizes, epilogue, row_scale)
        entries = ours(x, w, gs, epilogue, args.iters, on_gpu, row_scale, args.quick, check)
        if epilogue == "none":
            entries.update(jax_peers(x, w, sizes, args.iters, on_gpu and rows == prefill_rows, args.quick,
                                     args.mgpu, check))
        if on_gpu:
            entries["torch._grouped_mm" + ("" if epilogue == "none" else " + eager epilogue")] = torch_peer(
                rows, k, n, sizes, epilogue)
        results = timed(entries, args.iters)  # ours and the peers take turns
        flops = 2.0 * rows * k * n
        weight_bytes = int((sizes > 0).sum()) * k * n * jnp.dtype(dtype).itemsize
        decode = rows < prefill_rows
        torch_ms = next((ms for impl, (_, ms) in results.items() if impl.startswith("torch")), None)
        base = {"torch": torch_ms, "ragged_dot_mgpu": results.get("ragged_dot_mgpu", (0, None))[1],
                "dense": None if decode else results.get("dense (same FLOPs)", (0, None))[1]}
        for impl, (label, ms) in results.items():
            rate = (weight_bytes / (ms / 1e3) / 1e9) if decode else (flops / (ms / 1e3) / 1e12)
            unit = f"{rate:.0f} GB/s ({rate / bandwidth:.2f} of copy)" if decode else f"{rate:.0f} TFLOP/s"
            if decode and impl.startswith("dense"):
                unit = "n/a (one weight matrix)"
            ratios = " | ".join("" if b is None or not np.isfinite(ms) else f"{b / ms:.2f}" for b in base.values())
            lines.append(f"| {name} | {rows} | {kind} | {impl} | {label} | {ms:.3f} | {unit} | {ratios} |")
            print("  " + lines[-1], flush=True)

    card = jax.devices()[0].device_kind
    timed_mgpu = args.quick and args.mgpu and args.phase != "decode"  # it is a prefill/dW peer only
    mode = (", quick" if args.quick else "") + (" + ragged_dot_mgpu" if timed_mgpu else "") \
        + (", default tiles only" if DEFAULTS_ONLY else "") + (", sustained" if SUSTAIN_S else "")
    mode += "" if args.model == "deepseek_v3" or args.small else f", {args.model} dims"
    title = (f"## bench_grouped_matmul ({args.phase}{mode}): 1x {card}, {datetime.date.today()}, commit {commit()}, "
             f"jax {jax.__version__}, default implementation {default_implementation()!r}")
    notes = (f"{groups} groups, bf16 in, f32 accumulate, bf16 out; decode rates count the weight bytes of "
             f"non-empty groups; measured copy bandwidth {bandwidth:.0f} GB/s; median of {args.iters} samples "
             f"of {args.batch} back-to-back calls, every row of a case timed in turns with the others "
             "(round-robin: the card's clocks drift with its load); "
             + (f"each sample after {SUSTAIN_S:g} s of the same calls untimed (sustained: every row at its own "
                "steady clock under the card's power cap); " if SUSTAIN_S else "")
             + "a ratio column = that peer's time / this time (> 1: this row is faster); in dW rows the "
             "ragged_dot_mgpu column is JAX's transposed_ragged_dot_mgpu.")
    table = "\n".join(["| GEMM | rows | groups | implementation | best tiles | ms | rate "
                       "| vs torch | vs ragged_dot_mgpu | vs dense |",
                       "|---|---|---|---|---|---|---|---|---|---|"] + lines)
    text = f"\n{title}\n\n{notes}\n\n{table}\n"
    publish(text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
