"""Batched generation with a KV cache: one jitted prefill, then one jitted decode step per token.

Prompts of different lengths are left-padded (padding is masked out of attention
and of the MoE layers, and each prompt's positions start at 0), so every decode
step has the same shapes and the step compiles once. A sequence that emitted an
end-of-sequence token is finished: its later tokens are the pad id, and it is
masked out of the MoE layers; decoding stops once every sequence has finished.
"""
from __future__ import annotations

import collections
import collections.abc
import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wideep_jax._checks import is_int as _is_int
from wideep_jax.eplb.balancer import OnlineBalancer, layer_balancer, register_balancer as _register
from wideep_jax.jit import forward_jit
from wideep_jax.layer import MoELayer
from wideep_jax.models.decoder import CausalLM


class Generation(NamedTuple):
    tokens: np.ndarray  # int32 [B, max_new_tokens]; after a sequence's EOS: the pad id
    prefill_seconds: float  # compilation excluded (a warm-up call compiles both steps)
    decode_seconds: float
    expert_counts: np.ndarray  # int [MoE layers, E] routed pairs over prefill and decode


class _FromConfig:
    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG = _FromConfig()
"""`generate`'s ``eos_token_id`` default: the model config's ids."""


def _number(value) -> float | None:
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_sampling(temperature, top_p) -> tuple[float, float]:
    """``(temperature, top_p)`` as floats; ``ValueError`` naming the value unless the
    temperature is finite and >= 0 and ``0 < top_p <= 1``."""
    t, p = _number(temperature), _number(top_p)
    if t is None or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature={temperature!r}: allowed: a finite number >= 0 (0 = greedy)")
    if p is None or not 0 < p <= 1:  # NaN fails too
        raise ValueError(f"top_p={top_p!r}: allowed: a number with 0 < top_p <= 1")
    return t, p


def sample(logits: jax.Array, key: jax.Array, *, temperature, top_p, greedy: bool | None = None) -> jax.Array:
    """Greedy (argmax) or temperature + nucleus (top-p) sampling. [B, V] -> [B].

    ``greedy``: static; None decides by ``temperature == 0``, which needs a concrete
    temperature. Otherwise ``temperature`` and ``top_p`` may be traced (jit compiles once
    for all their values); concrete values must be a finite temperature >= 0 and
    ``0 < top_p <= 1`` (``ValueError`` naming them). A tiny positive temperature tends to
    greedy (no overflow to NaN)."""
    concrete = not any(isinstance(v, jax.core.Tracer) for v in (temperature, top_p))
    if concrete:
        temperature, top_p = check_sampling(temperature, top_p)
    if greedy is None:
        if not concrete:
            raise ValueError("sample: greedy=None needs a concrete temperature; allowed: greedy=True/False "
                             "with a traced temperature")
        greedy = temperature == 0.0
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    # Shifted so the largest logit is 0: dividing by a tiny temperature sends the others to
    # -inf, never inf - inf = NaN; the floor keeps 0 / temperature defined (denormals flush).
    temperature = jnp.maximum(jnp.asarray(temperature, jnp.float32), jnp.finfo(jnp.float32).tiny)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    # top_p = 1 keeps every token: the float32 cumsum over a large vocabulary can reach 1
    # before its tail, which the comparison alone would drop (HF applies no filter at 1).
    keep = (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1)
    keep = keep.at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _counts(stats) -> jax.Array:
    return jnp.stack([s.expert_counts for s in stats]) if stats else jnp.zeros((0, 0), jnp.int32)


def _is_eos(token, eos) -> jax.Array:
    # eos: int32 [slots], unused slots -1 (never a token): the ids are data, not constants.
    return (token[:, None] == eos[None, :]).any(axis=-1)


def _prefill(model: CausalLM, ids, positions, valid, cache, key, temperature, top_p, eos, pad, greedy, keep_stats):
    # The last valid token of each row predicts the next one (left padding: the last column).
    logits, cache, stats = model(ids, positions=positions, token_valid=valid, cache=cache, logits_to_keep=1)
    token = sample(logits[:, -1], jax.random.fold_in(key, 0), temperature=temperature, top_p=top_p, greedy=greedy)
    done = _is_eos(token, eos)
    return token, cache, _counts(stats), done, done.all(), stats if keep_stats else None


def _decode(model: CausalLM, token, positions, step, cache, total, done, key, temperature, top_p, eos, pad, greedy,
            keep_stats):
    """One token per sequence. Everything a step changes (positions, the step index, the
    cache, the expert counts, which sequences are done) comes back as device arrays for
    the next step, so the host only enqueues: no eager ops between steps. The layers'
    full statistics come back only for ``keep_stats`` (a balancer): the rest is left
    out, and XLA drops the collectives that gathered it.

    A finished sequence's token is ``pad``; it is fed as token 0 (``pad`` may lie outside
    the vocabulary) and masked, so it takes no expert capacity and is not counted in the
    expert statistics the balancer reads. The last output, ``done.all()``, is what the
    host reads to stop early."""
    live = ~done
    logits, cache, stats = model(jnp.where(done, 0, token)[:, None], positions=positions, token_valid=live[:, None],
                                 cache=cache)
    token = sample(logits[:, -1], jax.random.fold_in(key, step), temperature=temperature, top_p=top_p,
                   greedy=greedy)
    token = jnp.where(done, pad, token)
    done = done | _is_eos(token, eos)
    return (token, positions + 1, step + 1, cache, total + _counts(stats), done, done.all(),
            stats if keep_stats else None)


# Module-level, so later calls with the same shapes reuse the compiled steps. The
# cache (argument 4) is donated: each step updates it in place. Temperature and top_p
# are traced: other values reuse the compiled steps; only greedy or not is static.
_STATIC = ("greedy", "keep_stats")
_PREFILL_STEP = forward_jit(_prefill, static_argnames=_STATIC, donate_argnums=4)
_DECODE_STEP = forward_jit(_decode, static_argnames=_STATIC, donate_argnums=4)
# Decode steps the warm-up may take before the shardings settle (3 on an Explicit mesh, 2 at least).
_MAX_WARM_DECODE_STEPS = 4
# EOS ids go to the steps as an int32 array of this many slots (a multiple of it for
# more ids), so one to 8 ids, or none, share one compiled program.
_EOS_SLOTS = 8
# The host reads step t's "all done" flag after enqueuing step t + _STOP_LAG: reading
# the newest flag would make the host wait for every step before enqueuing the next
# one (the device would idle meanwhile). Costs at most this many steps past the last EOS.
_STOP_LAG = 2
# Keys (see _warm_key) of the step signatures a warm-up already compiled, most recent
# last: a later call with the same key skips the warm-up. Small: the oldest go first.
_WARMED: collections.OrderedDict = collections.OrderedDict()
_MAX_WARMED = 32


# model -> the OnlineBalancer model_balancer built for it (None: static placement). Weak
# keys: the entry goes with the model.
_BALANCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_balancer(model: CausalLM) -> OnlineBalancer | None:
    """The model's online EPLB balancer; None when its placement is static.

    For a model whose MoE layers' ``load_balancer`` is online
    (``layer_updates_per_iter > 0``, backend ``WIDEEP``): a live :class:`OnlineBalancer`
    the caller built over exactly those layers, else one built here on the first call
    and kept as long as the model lives, so the statistics and the host master copy
    carry over from one :func:`generate` call to the next. Raises ``ValueError`` when
    caller-built balancers cover only some of the layers (step them yourself, with
    ``generate(..., balance=False, after_step=...)``).
    """
    layers = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoELayer)]
    lb = layers[0].config.load_balancer if layers else None
    if lb is None or not lb.is_online:
        return None

    def covers(b: OnlineBalancer | None) -> bool:
        return b is not None and len(b.layers) == len(layers) and all(a is c for a, c in zip(b.layers, layers))

    kept = _BALANCERS.get(model)
    # The newest live balancer of each layer (dead references give None), besides the kept one.
    foreign = list({id(b): b for b in map(layer_balancer, layers) if b is not None and b is not kept}.values())
    if len(foreign) == 1 and covers(foreign[0]):
        chosen = foreign[0]
    elif foreign:
        raise ValueError(f"model: live OnlineBalancers over {sorted({len(b.layers) for b in foreign})} of its "
                         f"{len(layers)} MoE layers, none over exactly the model's MoE layers; allowed: one "
                         "balancer over all of them, or generate(..., balance=False) with your balancers' "
                         "step in after_step")
    elif covers(kept):
        chosen = kept
    else:
        _BALANCERS.pop(model, None)  # before building: never two host copies at once
        kept = None
        chosen = OnlineBalancer(layers)
    for layer in layers:  # again, where a newer balancer over some of them has gone
        _register(layer, chosen)
    _BALANCERS[model] = chosen  # lets go of one built here before, with its host copy
    return chosen


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             on_token: Callable[[int], None] | None = None, after_step: Callable[[list], None] | None = None,
             balance: bool = True, eos_token_id: int | Sequence[int] | None | _FromConfig = FROM_CONFIG,
             pad_token_id: int | None = None) -> Generation:
    """Generates up to ``max_new_tokens`` per prompt, stopping sequences at an EOS token.

    Args:
      model: a `CausalLM`.
      prompts: token-id lists (any lengths >= 1) of ints in ``[0, vocab_size)``: a sequence
        or iterable of them, or a 2-D array (one prompt per row).
      max_new_tokens: tokens to generate per prompt (>= 1).
      temperature, top_p: sampling: a finite temperature >= 0 (0 = greedy) and
        ``0 < top_p <= 1``. Traced: other values reuse the compiled steps (greedy or
        not compiles separately).
      seed: sampling key: an int in ``[-2**63, 2**63)``.
      on_token: called with the step index after each decode step is enqueued (progress bars;
        the device may still be running it). Not called for the steps an early stop skips.
      after_step: called with each step's per-layer ``MoEStats`` (e.g. a statistics recorder),
        after the balancer. Passing the balancer's own ``step`` here is harmless (it
        still runs once per step); a wrapper that steps it raises ``ValueError``
        (use ``balance=False`` to step it yourself). In a multi-process run it must
        behave alike on every process: one that raises on one process only leaves the
        others waiting in the next step's collectives (``wideep run`` then ends that
        process at once, so that jax.distributed's heartbeat ends the others).
      balance: with an online ``load_balancer`` in the model's ``moe_config``, re-place
        layers after every step (prefill and each decode step) with
        :func:`model_balancer` (a balancer you built over the model's layers is the one
        used); False keeps the placements as they are.
      eos_token_id: end-of-sequence id(s) in ``[0, vocab_size)``: an int, a sequence of
        ints, or None (never stop). Default: the model config's (config.json's
        ``eos_token_id``; none there: never stop). A sequence's EOS is kept in
        ``tokens``; its later positions hold ``pad_token_id``. Once every sequence has
        finished, decoding stops (up to 2 steps later: see ``_STOP_LAG``) and the rest
        of ``tokens`` is padding; `generated_lengths` gives each sequence's length.
        The ids are data: other values (up to 8 ids) do not recompile the steps.
      pad_token_id: any int32 (e.g. -1); default: the config's ``pad_token_id``, else the
        first EOS id.
    """
    prompts = _prompt_list(prompts)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: allowed: an int >= 1")
    if not _is_int(seed) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: allowed: an int in [-2**63, 2**63)")
    max_new_tokens = int(max_new_tokens)
    temperature, top_p = check_sampling(temperature, top_p)
    eos, pad = _stop_ids(model.cfg, eos_token_id, pad_token_id)
    stopping = bool((eos >= 0).any())
    rows = [_prompt_ids(row, prompt, model.cfg.vocab_size) for row, prompt in enumerate(prompts)]
    batch, width = len(rows), max(len(p) for p in rows)
    ids = np.zeros((batch, width), np.int32)
    valid = np.zeros((batch, width), bool)
    for row, prompt in enumerate(rows):
        ids[row, width - len(prompt):] = prompt
        valid[row, width - len(prompt):] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    _warn_past_max_positions(model.cfg, width, max_new_tokens)
    lengths = valid.sum(axis=1).astype(np.int32)
    balancer = model_balancer(model) if balance else None
    if balancer is not None and after_step == balancer.step:
        after_step = None  # the old pattern, after_step=balancer.step: step once, not twice
    hooks = balancer is not None or after_step is not None

    def after(stats) -> None:
        if balancer is not None:
            balancer.step(stats)
        if after_step is not None:
            state = balancer and balancer.state
            after_step(stats)
            if balancer is not None and balancer.state is not state:  # a wrapper around balancer.step
                raise ValueError("after_step stepped the model's balancer, which generate already steps "
                                 "(balance=True): each iteration would count twice; allowed: an after_step "
                                 "that does not step it, or balance=False to step it yourself")

    # Only greedy-or-not is static: other temperatures and top_p values are traced scalars.
    # The EOS ids and the pad id are traced too (without EOS ids: no slot matches, same program).
    sampling = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p), eos=jnp.asarray(eos),
                    pad=jnp.int32(pad), greedy=temperature == 0.0, keep_stats=hooks)
    key = jax.random.key(seed)
    args = (jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(valid))
    first_pos = jnp.asarray(lengths)[:, None]
    cache_len = width + max_new_tokens
    # The timed steps below must not compile: a warm-up compiles them first, once per
    # signature (a later call with the same shapes, shardings and static flags skips it).
    warm_key = _warm_key(model, batch, width, cache_len, sampling)
    if warm_key not in _WARMED or not _steps_compiled():
        _warm_up(model, args, first_pos, cache_len, key, sampling)
        _WARMED[warm_key] = None
        while len(_WARMED) > _MAX_WARMED:
            _WARMED.popitem(last=False)
    _WARMED.move_to_end(warm_key)

    prefill_bound, decode_bound = _PREFILL_STEP.bind(model), _DECODE_STEP.bind(model)
    # The warm-up's cache is gone by now (_warm_up returned): one cache at a time.
    cache = model.init_cache(batch, cache_len)
    start = time.perf_counter()
    token, cache, total, done, all_done, stats = prefill_bound(*args, cache, key, **sampling)
    jax.block_until_ready(token)
    prefill = time.perf_counter() - start
    if hooks:
        after(stats)
        decode_bound.refresh()  # the balancer may have replaced weights
    stop = stopping and bool(host_array(all_done))  # the prefill was waited for: no stall
    # The steps stay on the device until the end: a host read per step would make
    # the host wait for each step before it could enqueue the next one. The "all done"
    # flags are read _STOP_LAG steps late, and only when there are EOS ids.
    tokens, pos, step, flags = [token], first_pos, jnp.int32(1), collections.deque()
    start = time.perf_counter()
    for t in range(1, 1 if stop else max_new_tokens):
        token, pos, step, cache, total, done, all_done, stats = decode_bound(token, pos, step, cache, total, done,
                                                                             key, **sampling)
        tokens.append(token)
        if hooks:
            after(stats)
            decode_bound.refresh()
        if on_token is not None:
            on_token(t)
        if stopping:
            all_done.copy_to_host_async()  # in flight by the time it is read
            flags.append(all_done)
            if len(flags) > _STOP_LAG and bool(host_array(flags.popleft())):
                break
    ran = len(tokens)
    # The clock stops when the last step is done: the stack below compiles on a first call
    # (the warm-up does not stack) and copies to the host; neither is decoding.
    jax.block_until_ready(tokens[-1])
    decode = time.perf_counter() - start
    # Stacked at full length whatever step it stopped at: another count of arrays would
    # compile another stack. The columns an early stop skipped are padding (every
    # sequence had finished).
    tokens += tokens[-1:] * (max_new_tokens - ran)
    out = host_array(jnp.stack(tokens, axis=1)).astype(np.int32)
    out[:, ran:] = pad
    return Generation(out, prefill, decode, host_array(total).astype(np.int64))


def generated_lengths(tokens: np.ndarray, eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    """Each row's generated length: up to and including its first EOS (all of the row
    without one). ``tokens``: `Generation.tokens`; ``eos_token_id``: the ids
    `generate` stopped on (its default: ``model.cfg.eos_token_id``)."""
    tokens = np.asarray(tokens)
    if eos_token_id is None:
        eos_token_id = []
    ids = [int(eos_token_id)] if _is_int(eos_token_id) else [int(i) for i in eos_token_id]
    hit = np.isin(tokens, ids)
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1]).astype(np.int32)


def _warn_past_max_positions(cfg, longest_prompt: int, max_new_tokens: int) -> None:
    """Warns when a sequence would run past the model's ``max_position_embeddings``. Not an
    error: the cache is sized for every token and RoPE is computed per position, so nothing
    is clamped or corrupted; the model just extrapolates past its trained length (output
    quality may drop, as Hugging Face's warning says). ``None`` (a config.json without the
    key, or a config built by hand): nothing to check."""
    limit = cfg.max_position_embeddings
    total = longest_prompt + max_new_tokens
    if limit is not None and total > limit:
        warnings.warn(f"generate: the longest prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) "
                      f"= {total} positions, past the model's max_position_embeddings={limit}; RoPE extrapolates "
                      "beyond it and the output may degrade", stacklevel=3)


def _stop_ids(cfg, eos_token_id, pad_token_id) -> tuple[np.ndarray, int]:
    """The EOS ids as int32 [slots] (-1 in unused slots) and the pad id; ``ValueError``
    naming a bad one (an out-of-vocabulary id would never match a sampled token)."""
    vocab = cfg.vocab_size
    source = ""
    if eos_token_id is FROM_CONFIG:
        eos_token_id, source = tuple(cfg.eos_token_id), " (the model config's eos_token_id)"
    if eos_token_id is None:
        ids = []
    elif _is_int(eos_token_id):
        ids = [int(eos_token_id)]
    elif (isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, (str, bytes))
          or isinstance(eos_token_id, np.ndarray) and eos_token_id.ndim == 1) \
            and all(_is_int(i) for i in eos_token_id):
        ids = [int(i) for i in eos_token_id]
    else:
        raise ValueError(f"eos_token_id={eos_token_id!r}: allowed: an int token id, a sequence of them, or None "
                         "(never stop)")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"eos_token_id={eos_token_id!r}{source}: id {bad[0]} outside the vocabulary; allowed: "
                         f"0 <= id < vocab_size={vocab}, or eos_token_id=None (never stop)")
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (ids[0] if ids else 0)
    if not _is_int(pad_token_id) or not -2**31 <= pad_token_id < 2**31:
        raise ValueError(f"pad_token_id={pad_token_id!r}: allowed: an int32 (the output's fill after a "
                         "sequence's EOS)")
    slots = max(1, -(-len(ids) // _EOS_SLOTS)) * _EOS_SLOTS
    return np.array(ids + [-1] * (slots - len(ids)), np.int32), int(pad_token_id)


def _prompt_list(prompts) -> list:
    """The prompts as a list (an iterator is read once, here); a 2-D array gives one prompt
    per row. ``ValueError`` unless there is at least one prompt and each is a non-empty
    sequence (a flat list of ids, ``[1, 2]``, is refused: it is not a list of prompts)."""
    allowed = "allowed: one or more prompts, each a non-empty list of token ids (e.g. [[1, 2, 3]] for one prompt)"
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:
            raise ValueError(f"prompts: an array of shape {tuple(prompts.shape)}; allowed: shape [batch, length], "
                             f"or {allowed[len('allowed: '):]}")
        prompts = list(np.asarray(prompts))
    elif isinstance(prompts, (str, bytes)) or not isinstance(prompts, collections.abc.Iterable):
        raise ValueError(f"prompts={prompts!r}: {allowed}")
    else:
        prompts = list(prompts)
    if not prompts:
        raise ValueError(f"prompts={prompts!r}: {allowed}")
    for row, prompt in enumerate(prompts):
        try:
            size = len(prompt)
        except TypeError:  # an int (a flat list of ids given as the prompts) or a 0-d array
            raise ValueError(f"prompts[{row}]={prompt!r}: a single value, not a prompt; {allowed}") from None
        if size == 0:
            raise ValueError(f"prompts[{row}] is empty; {allowed}")
    return prompts


def _prompt_ids(row: int, prompt, vocab_size: int) -> np.ndarray:
    """One prompt as int64 ids; ``ValueError`` naming a non-integer or out-of-vocabulary id
    (the embedding gather would clamp it to another token silently)."""
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompts[{row}]={prompt!r}: allowed: a list of integer token ids in [0, {vocab_size})")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise ValueError(f"prompts[{row}][{int(bad[0])}]={int(ids[bad[0]])}: token id outside the vocabulary; "
                         f"allowed: 0 <= id < vocab_size={vocab_size}")
    return ids.astype(np.int64)


def _warm_key(model: CausalLM, batch: int, width: int, cache_len: int, sampling: dict):
    """What the steps' jit cache entries depend on: the model's structure and its arrays'
    shapes, dtypes and placements, the prompt and cache shapes, the static flags."""
    graphdef, state = nnx.split(model)
    arrays = tuple((a.shape, a.dtype, getattr(a, "sharding", None), getattr(a, "committed", None))
                   for a in jax.tree.leaves(state))
    return (graphdef, arrays, batch, width, cache_len, sampling["eos"].shape, sampling["greedy"],
            sampling["keep_stats"])


def _steps_compiled() -> bool:
    """False once jax's caches were cleared (jax.clear_caches): the warmed keys are stale."""
    sizes = [getattr(step.jitted, "_cache_size", lambda: 1)() for step in (_PREFILL_STEP, _DECODE_STEP)]
    return all(size > 0 for size in sizes)


def _warm_up(model: CausalLM, args, first_pos, cache_len: int, key, sampling: dict) -> None:
    """Compiles the prefill and decode steps on a throwaway cache, so the timed steps
    measure running time, not compilation: the prefill, then decode steps until the
    carried arrays come back with the shardings they went in with (the host's positions,
    then each step's outputs, may differ: P('ep',) vs P('ep', None) misses jit's cache),
    so every step of the timed loop finds its entry. Everything it made (the throwaway
    cache included) is dropped on return, before the real cache is allocated."""
    batch = args[0].shape[0]
    token, warm, counts, done, _, _ = _PREFILL_STEP(model, *args, model.init_cache(batch, cache_len), key,
                                                    **sampling)
    carried = (token, first_pos, jnp.int32(1), warm, counts, done)
    del token, warm, counts, done
    for step in range(_MAX_WARM_DECODE_STEPS):
        out = _DECODE_STEP(model, *carried, key, **sampling)[:6]
        # A committed and an uncommitted array on one device have equal shardings but
        # separate cache entries: compare both. At least two steps: the host's inputs
        # are uncommitted, the step's outputs committed.
        settled = step > 0 and _placement(out) == _placement(carried)
        carried = out
        del out
        if settled:
            break
    jax.block_until_ready(carried)


def _placement(tree) -> list:
    """What jit's cache keys on besides shapes: each array's sharding and committedness."""
    return [(a.sharding, a.committed) for a in jax.tree.leaves(tree)]


def host_array(a: jax.Array) -> np.ndarray:
    """``a`` as NumPy in every process; gathered when its shards span processes
    (sequences are split over the EP group, which may span hosts)."""
    if a.is_fully_addressable or a.is_fully_replicated:
        return np.asarray(a)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
