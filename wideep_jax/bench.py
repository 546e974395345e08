"""Benchmark helpers shared by ``wideep bench-moe`` and ``benchmarks/``.

Timing follows the usual rules for asynchronous devices: compile and warm up
first, block on the result, repeat, take the median.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from wideep_jax.config import MoEConfig
from wideep_jax.jit import BoundForward, forward_jit
from wideep_jax.layer import MoELayer
from wideep_jax.moe import MoEStats
from wideep_jax.routing import Routing
from wideep_jax.spec import MoESpec


def parse_skew(text: str) -> float | None:
    """``"uniform"`` -> 0.0, ``"zipf:1.2"`` -> 1.2, ``"router"`` -> None (use the layer's router)."""
    if text == "uniform":
        return 0.0
    if text == "router":
        return None
    if text.startswith("zipf:"):
        try:
            value = float(text[5:])
        except ValueError:
            value = -1.0
        if 0 < value < float("inf"):
            return value
    raise ValueError(f"--skew={text!r}: allowed: 'uniform', 'router' or 'zipf:S' with a finite S > 0")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (--iters, --loop, --tokens, ...): an integer >= 1. argparse
    names the flag: ``argument --loop: '0': allowed: an integer >= 1``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: an integer >= 1")
    return value


def synthetic_routing(key: jax.Array, num_tokens: int, num_experts: int, top_k: int,
                      zipf_exponent: float) -> Routing:
    """Top-k distinct experts per token; expert popularity ~ Zipf(exponent) over a
    random ranking of experts (0 = uniform). Weights: softmax of random logits."""
    k_rank, k_gumbel, k_weight = jax.random.split(key, 3)
    rank = jax.random.permutation(k_rank, num_experts) + 1
    log_p = -zipf_exponent * jnp.log(rank.astype(jnp.float32))
    gumbel = jax.random.gumbel(k_gumbel, (num_tokens, num_experts))
    _, ids = jax.lax.top_k(log_p[None, :] + gumbel, top_k)  # Gumbel top-k = sampling w/o replacement
    weights = jax.nn.softmax(jax.random.normal(k_weight, (num_tokens, top_k)), axis=-1)
    return Routing(ids.astype(jnp.int32), weights.astype(jnp.float32))


def time_fn(fn: Callable[[], object], *, iters: int, warmup: int = 2, batch: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (which returns arrays), after warm-up.

    Each sample times ``batch`` back-to-back calls and divides: with batch > 1
    the host's dispatch and sync latency (tens of µs) overlaps device work, so
    short kernels are timed by the device, not by the host.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(batch)])
        times.append((time.perf_counter() - start) / batch)
    return times


def device_loop(fn: Callable[..., object], calls: int, perturb: int = 0) -> Callable[..., jax.Array]:
    """One jitted program running ``fn(*args)`` ``calls`` times back to back.

    Timed through `seconds_per_call` it gives the device's time per call even where
    one call is shorter than the host's dispatch (µs-scale kernels). Each call
    depends on the previous one: ``args[perturb]`` (a numeric array) gets the previous
    result's first elements (one per output array) times 0 added to its first
    element, so XLA can neither hoist nor merge the calls, and an optimization
    barrier makes it compute every output element; that costs a few one-element
    ops per call.
    """

    def program(*args):
        def step(_, carry):
            args, acc = carry
            a = args[perturb]
            a = a.at[(0,) * a.ndim].add((acc * 0).astype(a.dtype))
            args = args[:perturb] + (a,) + args[perturb + 1:]
            # The barrier keeps XLA from computing only the elements read below.
            outs = jax.lax.optimization_barrier(jax.tree.leaves(fn(*args)))
            firsts = [leaf.reshape(-1)[0].astype(jnp.float32) for leaf in outs]
            return args, acc + sum(firsts)

        return jax.lax.fori_loop(0, calls, step, (tuple(args), jnp.float32(0)), unroll=True)[1]

    return jax.jit(program)


def seconds_per_call(build: Callable[[int], Callable[[], object]], calls: int, *, iters: int) -> float:
    """Device seconds per call of a program of back-to-back calls, as a slope.

    ``build(n)`` returns a no-argument function that runs one program of ``n``
    calls. Programs of ``calls`` and ``2 * calls`` calls are timed (medians of
    ``iters``, samples of the two interleaved) and the difference is divided by
    ``calls``, so the costs every run pays once (the host's launch and sync, and
    across GPUs their start skew, hundreds of µs) cancel instead of being spread
    over the calls. NaN when the slope is not positive even with twice the samples
    (run-to-run noise larger than the calls' time; CPU smoke runs).
    """
    short, long = build(calls), build(2 * calls)
    for fn in (short, long):
        for _ in range(2):
            jax.block_until_ready(fn())
    t_short, t_long = [], []
    for _ in range(2):  # a second round with twice the samples if noise hid the slope
        for _ in range(iters):
            for fn, times in ((short, t_short), (long, t_long)):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times.append(time.perf_counter() - start)
        slope = (statistics.median(t_long) - statistics.median(t_short)) / calls
        if slope > 0:
            return slope
    return float("nan")  # not resolved: the runs' noise exceeds the calls' time


def copy_rate(iters: int, *, batch: int = 1) -> float:
    """The device's measured copy rate in bytes/s (read + write) of a 2 GiB bf16 array
    (16 MiB on CPU): the bound for kernels that stream weights from memory."""
    n = (1 << 30) if jax.default_backend() == "gpu" else (1 << 23)
    a = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    return 2 * a.nbytes / (median_ms(time_fn(lambda: f(a), iters=iters, batch=batch)) / 1e3)


def median_ms(seconds: list[float]) -> float:
    """Median of a list of seconds, in milliseconds."""
    return 1e3 * statistics.median(seconds)


Sampler = Callable[[], float]  # one timed sample: seconds per call over a batch of back-to-back calls


def sampler(run: Callable[[int], None], *, batch: int, sustain_s: float = 0.0) -> Sampler:
    """A sample of ``run(n)`` (n back-to-back calls, then a sync): ``batch`` calls timed,
    after ``sustain_s`` seconds of the same calls untimed. The H200 holds its 700 W cap
    by lowering clocks, so a kernel that draws more power runs slower when it runs
    for long; sustained, each entry is timed at its own steady clock, not at the
    clock the previous entry left behind."""
    def sample() -> float:
        end = time.perf_counter() + sustain_s
        while time.perf_counter() < end:
            run(10)
        start = time.perf_counter()
        run(batch)
        return (time.perf_counter() - start) / batch
    return sample


def jax_sampler(fn: Callable[[], object], *, batch: int, sustain_s: float = 0.0) -> Sampler:
    """`sampler` of a zero-argument jax callable (compile and warm it up first)."""
    def run(calls: int) -> None:
        out = None
        for _ in range(calls):  # hold only the last result: outputs can be hundreds of MB
            out = fn()
        jax.block_until_ready(out)
    return sampler(run, batch=batch, sustain_s=sustain_s)


def race(samplers: dict[str, Sampler], iters: int) -> dict[str, float]:
    """Median ms of each sampler, timed round-robin (one sample each per round): the
    card's clocks drift with its recent load (by up to 15 % within a process on an
    H200), and taking turns makes every entry see the same drift."""
    samples = {name: [] for name in samplers}
    for _ in range(iters):
        for name, sample in samplers.items():
            samples[name].append(sample())
    return {name: median_ms(times) for name, times in samples.items()}


def imbalance(loads) -> float:
    """(max - mean) / mean, TensorRT-LLM's balance metric (0 = perfect)."""
    loads = np.asarray(loads, np.float64)
    mean = loads.mean()
    return float((loads.max() - mean) / mean) if mean > 0 else 0.0


def rank_rows(stats: MoEStats, ep_size: int) -> np.ndarray:
    """Expert rows computed per EP rank: slot counts summed over each rank's slots."""
    return np.asarray(stats.slot_counts).reshape(ep_size, -1).sum(axis=1)


@dataclasses.dataclass
class MoEBenchResult:
    """One layer-forward measurement."""

    seconds: list[float]
    compile_seconds: float
    num_tokens: int
    stats: MoEStats
    ep_size: int

    @property
    def median_ms(self) -> float:
        return median_ms(self.seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / (self.median_ms / 1e3)

    def rank_rows(self) -> np.ndarray:
        """Expert rows computed per rank."""
        return rank_rows(self.stats, self.ep_size)


_LAYER_FORWARD = forward_jit(lambda layer, x, routing: layer(x, routing=routing))


def jitted_forward(layer: MoELayer) -> BoundForward:
    """The layer's forward, jitted and bound to its weights: ``forward(x, routing)``."""
    return _LAYER_FORWARD.bind(layer)


def bench_moe_layer(spec: MoESpec, config: MoEConfig, mesh, *, tokens_per_rank: int,
                    skew: float | None, iters: int, seed: int = 0, layer_idx: int | None = None
                    ) -> MoEBenchResult:
    """Builds a layer with random weights and times its jitted forward."""
    layer = MoELayer(spec, config, mesh=mesh, layer_idx=layer_idx, rngs=nnx.Rngs(seed))
    ep = mesh.shape[config.ep_axis] if mesh is not None and config.ep_axis in mesh.axis_names else 1
    num_tokens = tokens_per_rank * ep
    key_x, key_r = jax.random.split(jax.random.key(seed + 1))
    token_sharding = None if mesh is None else NamedSharding(mesh, P(config.ep_axis))
    x = jax.random.normal(key_x, (num_tokens, spec.hidden_size), jnp.float32).astype(spec.dtype)
    routing = None
    if skew is not None:
        routing = synthetic_routing(key_r, num_tokens, spec.num_experts, spec.top_k, skew)
    if token_sharding is not None:
        x = jax.device_put(x, token_sharding)
        routing = None if routing is None else jax.device_put(routing, token_sharding)
    forward = jitted_forward(layer)
    start = time.perf_counter()
    _, stats = jax.block_until_ready(forward(x, routing))
    compile_seconds = time.perf_counter() - start
    seconds = time_fn(lambda: forward(x, routing), iters=iters)
    return MoEBenchResult(seconds, compile_seconds, num_tokens, stats, ep)


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One op's time in a profiled call: total µs over its launches, and their count."""

    name: str
    us: float
    count: int


def profile_ops(fn: Callable[[], object], *, device: int = 0, host: bool = False
                ) -> tuple[list[OpTime], float, float]:
    """Runs ``fn`` once under `jax.profiler.trace`; returns (ops by total time, busy µs, wall µs).

    On a GPU the ops are device ``device``'s kernels, named by the HLO op that
    launched them where the trace says so (else, and inside command buffers, by
    the kernel's name: XLA names its kernels after their fusions), and busy µs
    is the union of their intervals over all streams: wall minus busy is time the
    device idled (host-bound launches, syncs). On CPU the ops are the XLA ops
    the host threads ran. ``host=True`` lists every host event instead (Python
    calls, the runtime's launches; nested events each count their whole span),
    to see where a host-bound step spends its time. Call ``fn`` once before, so
    compiling is not traced.
    """
    import glob
    import tempfile

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            wall_us = (time.perf_counter() - start) * 1e6
        files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
        data = jax.profiler.ProfileData.from_file(files[0])
    gpu = f"/device:GPU:{device}"
    wanted = gpu if jax.default_backend() == "gpu" and not host else "/host:CPU"
    planes = [p for p in data.planes if p.name == wanted]
    if not planes:
        raise RuntimeError(f"the trace has no plane {wanted!r}; it has {[p.name for p in data.planes]}")
    totals: dict[str, list[float]] = {}
    spans = []
    for plane in planes:
        for line in plane.lines:
            if plane.name == gpu and not line.name.startswith("Stream"):
                continue  # derived lines (XLA Modules / Ops, Steps) repeat the streams' kernels
            for event in line.events:
                stats = dict(event.stats)
                if plane.name != gpu and "hlo_op" not in stats and not host:
                    continue  # host-side bookkeeping, not an op
                if host and ("profiler.py" in event.name or "contextlib.py" in event.name):
                    continue  # the trace's own start and stop
                op = str(stats.get("hlo_op", ""))
                # Kernels of an XLA command buffer (a CUDA graph) all carry its name: use theirs.
                name = op if op and not op.startswith("command_buffer") else event.name
                entry = totals.setdefault(name, [0.0, 0])
                entry[0] += event.duration_ns / 1e3
                entry[1] += 1
                spans.append((event.start_ns, event.start_ns + event.duration_ns))
    busy_us, end = 0.0, float("-inf")
    for lo, hi in sorted(spans):  # union of the intervals
        if hi > end:
            busy_us += (hi - max(lo, end)) / 1e3
            end = hi
    ops = sorted((OpTime(n, us, c) for n, (us, c) in totals.items()), key=lambda op: -op.us)
    return ops, busy_us, wall_us


def ops_table(ops: list[OpTime], busy_us: float, wall_us: float, *, top: int = 20, what: str = "device") -> str:
    """A markdown table of the ``top`` ops of `profile_ops`, with their share of busy time."""
    lines = [f"{what} busy {busy_us:.0f} µs of {wall_us:.0f} µs wall; top ops:",
             "| op | µs | launches | share of busy |", "|---|---|---|---|"]
    for op in ops[:top]:
        lines.append(f"| {op.name[:90]} | {op.us:.1f} | {op.count} | {op.us / max(busy_us, 1e-9):.1%} |")
    return "\n".join(lines)
