"""One process of an EP group over N processes: ``multiprocess_child.py PID N PORT OUT SEED cpu|gpu``.

``cpu`` (tests/test_multiprocess.py): each process has 8 // N emulated CPU
devices and gloo carries the collectives. ``gpu`` (tests/test_gpu_multiprocess.py):
each process has the GPUs it is given and the all-to-all backend is ``auto``
(``nccl`` across processes). One EP mesh spans every process's devices.
Every process draws the same inputs from the same seed (SEED), runs the WIDEEP
layer and the online balancer in each re-sharding mode, and checks what it sees
against references built from gathered arrays:
  - layer outputs against the dense reference (random and all-to-one-expert routing);
  - after every balancer step, each slot's weights bit for bit equal to its
    expert's initial weights, and the placement a valid covering one;
  - no compilation after the first iteration (routing and placement are data).
Process 0 also writes a statistics directory (``OUT/stats``). Each process
prints ``OK <pid> ...`` as its last line when every check passed.
"""
from __future__ import annotations

import os
import sys
import traceback

pid, nproc, port, out_dir, seed, platform = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                              int(sys.argv[5]), sys.argv[6])
if platform == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from moe_helpers import count_compiles  # noqa: E402
from wideep_jax import MoELayer, MoESpec, RouterSpec, forward_jit, load_moe_config  # noqa: E402
from wideep_jax.eplb import OnlineBalancer  # noqa: E402
from wideep_jax.eplb.stats_files import StatsRecorder, load_stats  # noqa: E402
from wideep_jax.reference import dense_moe_reference  # noqa: E402
from wideep_jax.routing import Routing  # noqa: E402

EP = jax.device_count()  # every process's devices
EXPERTS, SLOTS, TOKENS, HIDDEN = 16, 24, 64, 32


def gathered(a) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def check(cond: bool, what: str) -> None:
    if not cond:
        fail(what)


def fail(what: str) -> None:
    # os._exit: a normal exit would wait in jax.distributed's shutdown barrier for
    # processes that are themselves waiting in a collective for this one.
    print(f"FAILED <{pid}> {what}", flush=True)
    os._exit(1)


def run_mode(mode: str, rng: np.random.Generator, mesh) -> int:
    spec = MoESpec(hidden_size=HIDDEN, intermediate_size=16, num_experts=EXPERTS, top_k=4,
                   router=RouterSpec(kind="noaux_tc", n_group=4, topk_group=2, routed_scaling_factor=2.5),
                   dtype=jnp.float32, param_dtype=jnp.float32)
    reshard = "collective" if mode == "collective" else "host"
    cfg = load_moe_config({"backend": "WIDEEP", "load_balancer": {
        "num_slots": SLOTS, "layer_updates_per_iter": 1, "reshard": reshard, "tolerance": 0.0}},
        num_experts=EXPERTS, ep_size=EP)
    layers = [MoELayer(spec, cfg, mesh=mesh, layer_idx=i, rngs=nnx.Rngs(10 + i)) for i in range(2)]
    experts = []  # per layer: each expert's (gate_up, down) from its first initial slot
    for layer in layers:
        placement = gathered(layer.slot_to_expert[...])
        first = [int(np.flatnonzero(placement == e)[0]) for e in range(EXPERTS)]
        experts.append(tuple(gathered(w[...])[first] for w in (layer.w_gate_up, layer.w_down)))
    balancer = OnlineBalancer(layers, replicate_master=mode == "host_replicated")
    forward = forward_jit(lambda m, x, r: m(x, routing=r))
    routed = forward_jit(lambda m, x: m(x))
    tokens = NamedSharding(mesh, P("ep"))
    moved = 0
    for it in range(6):
        with count_compiles() as compiles:
            host_x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
            x = jax.make_array_from_callback(host_x.shape, tokens, lambda idx: host_x[idx])
            if it % 3 == 2:  # adversarial: every token to one expert, plus three others
                ids = np.tile(np.array([EXPERTS - 1, 0, 1, 2], np.int32), (TOKENS, 1))
            else:  # skewed: a hot set of experts
                ids = np.stack([rng.choice(EXPERTS, 4, replace=False, p=np.r_[np.full(4, 0.15),
                                                                             np.full(12, 0.4 / 12)])
                                for _ in range(TOKENS)]).astype(np.int32)
            weights = rng.uniform(0.1, 1.0, ids.shape).astype(np.float32)
            routing = Routing(jax.device_put(ids, tokens), jax.device_put(weights, tokens))
            stats = []
            for layer in layers:
                y, s = forward(layer, x, routing)
                y2, _ = routed(layer, x)
                stats.append(s)
                w = jax.tree.map(lambda a: None if a is None else jnp.asarray(gathered(a)), layer.weights())
                ref = dense_moe_reference(jnp.asarray(host_x), w, spec,
                                          routing=Routing(jnp.asarray(ids), jnp.asarray(weights)))
                ref2 = dense_moe_reference(jnp.asarray(host_x), w, spec)
                for got, want, name in ((y, ref, "given routing"), (y2, ref2, "router")):
                    err = np.abs(gathered(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
                    check(err < 1e-5, f"{mode} iter {it} {name}: relative error {err:.2e}")
                counts = gathered(s.expert_counts)
                check(counts[EXPERTS - 1] == TOKENS if it % 3 == 2 else counts.sum() == TOKENS * 4,
                      f"{mode} iter {it}: expert counts {counts.tolist()}")
            before = [gathered(layer.slot_to_expert[...]) for layer in layers]
            balancer.step(stats)
        if it > 1:
            check(compiles[0] == 0, f"{mode} iter {it}: {compiles[0]} compilations")
        for layer, want, old in zip(layers, experts, before):
            placement = gathered(layer.slot_to_expert[...])
            moved += int((placement != old).sum())
            check(set(placement.tolist()) == set(range(EXPERTS)), f"{mode}: placement {placement.tolist()}")
            for w, expert_w in zip((layer.w_gate_up, layer.w_down), want):
                check(np.array_equal(gathered(w[...]), expert_w[placement]),
                      f"{mode} iter {it}: slot weights differ from their experts' after the step")
    check(moved > 0, f"{mode}: the balancer moved no slot in 6 skewed iterations")
    return moved


def main() -> None:
    mesh = jax.make_mesh((EP,), ("ep",))
    check(jax.process_count() == nproc and len(jax.local_devices()) == EP // nproc, "process layout")
    if platform == "gpu":
        from wideep_jax.comm import resolve_alltoall_backend
        backend = resolve_alltoall_backend("auto", mesh, "ep")
        check(backend == "nccl", f"the auto all-to-all across processes is {backend!r}, not 'nccl'")
    moved = {mode: run_mode(mode, np.random.default_rng(seed), mesh)
             for mode in ("host", "host_replicated", "collective")}
    # Statistics files: counts are replicated, so process 0 alone writes them.
    rec = StatsRecorder(os.path.join(out_dir, "stats"), 0, 2, num_experts=EXPERTS, top_k=4)
    spec = MoESpec(hidden_size=HIDDEN, intermediate_size=16, num_experts=EXPERTS, top_k=4,
                   dtype=jnp.float32, param_dtype=jnp.float32)
    layer = MoELayer(spec, load_moe_config({"backend": "WIDEEP"}, num_experts=EXPERTS, ep_size=EP),
                     mesh=mesh, layer_idx=0, rngs=nnx.Rngs(0))
    x = jax.device_put(np.random.default_rng(seed + 1).standard_normal((TOKENS, HIDDEN)).astype(np.float32),
                       NamedSharding(mesh, P("ep")))
    total = np.zeros(EXPERTS, np.int64)
    forward = forward_jit(lambda m, v: m(v))  # one jitted function: compiled once, not per iteration
    for it in range(3):
        _, s = forward(layer, x)
        if it < 2:
            total += gathered(s.expert_counts)
        rec.record(it, 0, s)
    multihost_utils.sync_global_devices("stats written")
    loaded = load_stats(os.path.join(out_dir, "stats"))
    check(loaded.ep_size == EP and np.array_equal(loaded.load()[0], total),
          "statistics files: ranks or counts differ from the layer's")
    print(f"OK <{pid}> moved {moved}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        fail("exception")
