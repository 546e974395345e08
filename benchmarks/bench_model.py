"""A multi-layer DeepSeek-V3-shaped model: prefill and decode tokens/s, Pallas expert kernels vs XLA.

    python benchmarks/bench_model.py --ep 4 --layers 4   # GPU: real layer dims, random weights
    python benchmarks/bench_model.py --small             # CPU smoke run of the same code

The model has DeepSeek-V3's layer dims (MLA attention, 256 experts top-8 with
grouped routing, one shared expert; the first layer dense) and as many layers as
``--layers`` asks, with wide EP over ``--ep`` devices. Both runs use the same
model; one sets ``moe_config.expert_kernel: xla`` (the portable path), the other
``auto`` (the Pallas kernels on GPU). Prefill: a batch of prompts in one call;
decode: one token per sequence per step, with a KV cache. Appends to RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_moe_layer import check_ep, commit, publish  # noqa: E402
from wideep_jax import forward_jit  # noqa: E402
from wideep_jax.bench import ops_table, profile_ops  # noqa: E402
from wideep_jax.comm import resolve_alltoall_backend  # noqa: E402
from wideep_jax.config import load_moe_config  # noqa: E402
from wideep_jax.models import CausalLM, DecoderConfig  # noqa: E402
from wideep_jax.models.config import MLAConfig  # noqa: E402
from wideep_jax.routing import RouterSpec  # noqa: E402


def deepseek_v3(layers: int, small: bool, dtype) -> DecoderConfig:
    if small:
        mla = MLAConfig(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        dims = dict(vocab_size=512, hidden_size=128, num_attention_heads=4, intermediate_size=256,
                    moe_intermediate_size=32, num_experts=32)
    else:
        mla = MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128)
        dims = dict(vocab_size=129280, hidden_size=7168, num_attention_heads=128, intermediate_size=18432,
                    moe_intermediate_size=2048, num_experts=256)
    return DecoderConfig(
        model_type="deepseek_v3", num_hidden_layers=layers + 1, num_key_value_heads=dims["num_attention_heads"],
        head_dim=mla.qk_rope_head_dim, num_experts_per_tok=8, moe_layers=tuple(range(1, layers + 1)),
        mla=mla, n_shared_experts=1, dtype=dtype,
        router=RouterSpec(kind="noaux_tc", n_group=8, topk_group=4, routed_scaling_factor=2.5), **dims)


def check_fits(cfg: DecoderConfig, ep: int, layers: int, dtype) -> None:
    """Exits naming the largest ``--layers`` that fits when the weights would not fit one device.

    Counts the routed experts (sharded over EP) and the embedding and output matrices; the
    rest of the model, its caches and activations get the remaining tenth of the memory (an
    H200 holds 4 layers at EP1 that way).
    """
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:  # CPU, or a platform that does not say
        return
    itemsize = jnp.dtype(dtype).itemsize
    per_layer = cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * itemsize / ep
    fixed = 2 * cfg.vocab_size * cfg.hidden_size * itemsize
    budget = 0.9 * limit
    if fixed + layers * per_layer > budget:
        fits = int((budget - fixed) // per_layer)
        allowed = f"--layers 1..{fits} or a larger --ep" if fits > 0 else "a larger --ep"
        sys.exit(f"--layers {layers} at --ep {ep}: the routed experts and embeddings alone take "
                 f"{(fixed + layers * per_layer) / 1e9:.1f} GB per device, more than 90 % of the "
                 f"{limit / 1e9:.1f} GB JAX may use on this {jax.devices()[0].device_kind} "
                 f"(XLA_PYTHON_CLIENT_MEM_FRACTION); allowed here: {allowed}")


def greedy_step(m, ids, cache):
    """One program per step: the model (last position's logits only) and the next token."""
    logits, cache = m(ids, cache=cache, logits_to_keep=1)[:2]
    return jnp.argmax(logits[:, -1], -1)[:, None], cache


# Module-level, so runs whose configs alternate reuse their compiled steps. The cache
# (argument 2) is donated: it is updated in place.
STEP = forward_jit(greedy_step, donate_argnums=2)


def run_once(model: CausalLM, ids, steps: int) -> tuple[float, float, float]:
    """Seconds of one prefill, per decode step, and per decode step to enqueue it (the host's share)."""
    batch, prompt_len = ids.shape
    step = STEP.bind(model)
    cache = model.init_cache(batch, prompt_len + steps)
    start = time.perf_counter()
    token, cache = step(ids, cache)
    jax.block_until_ready(token)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        token, cache = step(token, cache)
    enqueue = (time.perf_counter() - start) / steps
    jax.block_until_ready(token)
    return prefill, (time.perf_counter() - start) / steps, enqueue


def print_profile(model: CausalLM, ids, steps: int) -> None:
    """The top device ops and host events of one prefill and one decode step (GPU 0)."""
    step = STEP.bind(model)
    token = jnp.zeros((ids.shape[0], 1), ids.dtype)
    for name, tokens in (("prefill", ids), ("decode step", token)):
        fresh = jax.block_until_ready(model.init_cache(ids.shape[0], ids.shape[1] + steps))  # donated
        ops, busy, wall = profile_ops(lambda: step(tokens, fresh))
        print(f"  profile of one {name}: {ops_table(ops, busy, wall)}", flush=True)
        fresh = jax.block_until_ready(model.init_cache(ids.shape[0], ids.shape[1] + steps))
        ops, busy, wall = profile_ops(lambda: step(tokens, fresh), host=True)
        print(f"  host events of one {name}: {ops_table(ops, busy, wall, top=30, what='host')}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (after one dense layer)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="CPU smoke dims")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--runs", default="xla/xla,xla/auto,auto/auto",
                        help="alltoall/expert_kernel pairs to run, comma-separated; the first is the ratios' base")
    parser.add_argument("--profile", action="store_true",
                        help="print each run's top device ops for one prefill and one decode step")
    args = parser.parse_args()
    if args.small:
        args.batch, args.prompt_len, args.decode_steps, args.iters = 2, 16, 3, 1
    check_ep(args.ep)
    ep = args.ep
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    cfg = deepseek_v3(args.layers, args.small, dtype)
    check_fits(cfg, ep, args.layers, dtype)
    mesh = jax.make_mesh((ep,), ("ep",), devices=jax.devices()[:ep], axis_types=(jax.sharding.AxisType.Auto,))
    base = load_moe_config({"backend": "WIDEEP"}, num_experts=cfg.num_experts, ep_size=ep)
    model = CausalLM(cfg, base, mesh=mesh, rngs=nnx.Rngs(0))
    lines, results = [], {}
    # By default the portable path (XLA all-to-all, XLA expert loop), then ours piece by piece.
    runs = [tuple(r.split("/")) for r in args.runs.split(",")]
    if any(len(r) != 2 for r in runs):
        raise SystemExit(f"--runs {args.runs!r}: each run is alltoall/expert_kernel, e.g. xla/auto")
    def use(alltoall: str, kernel: str) -> None:  # same weights, other backends
        config = dataclasses.replace(base, expert_kernel=kernel, alltoall_backend=alltoall)
        for layer in model.layers:
            if hasattr(layer.mlp, "slot_to_expert"):
                layer.mlp.config = config

    ids = jax.random.randint(jax.random.key(0), (args.batch, args.prompt_len), 0, model.cfg.vocab_size)
    for run in runs:  # compiles each run's prefill and decode step (not timed)
        use(*run)
        run_once(model, ids, args.decode_steps)
    # The runs take turns, one round each per iteration: the card's clocks drift with its
    # recent load, and taking turns makes every run see the same drift.
    samples = {run: [] for run in runs}
    for _ in range(args.iters):
        for run in runs:
            use(*run)
            samples[run].append(run_once(model, ids, args.decode_steps))
    for alltoall, kernel in runs:
        prefill_ms, decode_ms, enqueue_ms = (1e3 * float(np.median(x)) for x in zip(*samples[alltoall, kernel]))
        if args.profile:
            use(alltoall, kernel)
            print(f"  {alltoall}/{kernel}:", flush=True)
            print_profile(model, ids, args.decode_steps)
        results[alltoall, kernel] = (prefill_ms, decode_ms)
        prefill_tps = args.batch * args.prompt_len / (prefill_ms / 1e3)
        decode_tps = args.batch / (decode_ms / 1e3)
        portable = results[runs[0]]
        ratio = "" if (alltoall, kernel) == runs[0] else (f"{portable[0] / prefill_ms:.2f} / "
                                                          f"{portable[1] / decode_ms:.2f}")
        comm = resolve_alltoall_backend(alltoall, mesh, base.ep_axis)
        lines.append(f"| alltoall={alltoall} ({comm}), expert_kernel={kernel} | {prefill_ms:.1f} | "
                     f"{prefill_tps:,.0f} | {decode_ms:.2f} | {enqueue_ms:.2f} | {decode_tps:,.0f} | {ratio} |")
        print("  " + lines[-1], flush=True)
    card = jax.devices()[0].device_kind
    title = (f"## bench_model: {ep}x {card}, EP{ep}, {datetime.date.today()}, commit {commit()}, "
             f"jax {jax.__version__}")
    notes = (f"DeepSeek-V3 layer dims{' (scaled down)' if args.small else ''}, 1 dense + {args.layers} MoE "
             f"layers, random weights, {jnp.dtype(dtype).name}; prefill: {args.batch} prompts x "
             f"{args.prompt_len} tokens; decode: {args.batch} sequences, {args.decode_steps} steps; attention "
             "data parallel over EP (sequences split); median of "
             f"{args.iters} rounds in which the runs take turns; host ms/step = the host's time to enqueue "
             "a decode step (jit dispatch), which "
             "bounds decode from below when it exceeds the device's time; ratio = the first row's time / "
             "this time (prefill / decode).")
    table = "\n".join(["| run | prefill ms | prefill tokens/s | decode ms/step | host ms/step | decode tokens/s "
                        "| speed-up |", "|---|---|---|---|---|---|---|"] + lines)
    publish(f"\n{title}\n\n{notes}\n\n{table}\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
