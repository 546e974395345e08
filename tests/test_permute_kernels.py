"""The Pallas row gather and pair combine on CPU: interpret mode against NumPy
and against `wideep_jax.experts`, argument checks, and lowering to Triton IR
for CUDA.

Small shapes with small blocks (several row and column blocks, tails in both)
keep interpret mode fast; fresh random inputs each run (the seed is printed on
failure).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import permute
from wideep_jax import experts

# Lowering emits a DeprecationWarning for the Pallas Triton backend; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
DTYPES = [jnp.bfloat16, jnp.float32]
BLOCKS = dict(block_rows=8, block_cols=32)
# (N source rows, H, R gathered rows): tails in R and H, exact multiples, H < block_cols.
SHAPES = [(13, 100, 37), (8, 64, 32), (5, 7, 3)]


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _index(kind: str, n: int, r: int, rng) -> np.ndarray:
    if kind == "one_token":
        return np.full(r, rng.integers(n), np.int32)
    if kind == "ends":
        return rng.choice([0, n - 1], r).astype(np.int32)
    return rng.integers(0, n, r).astype(np.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "one_token", "ends"])
@pytest.mark.parametrize("n,h,r", SHAPES)
def test_gather_bitwise(rng, dtype, kind, n, h, r):
    x = jnp.asarray(rng.standard_normal((n, h)), dtype)
    index = _index(kind, n, r, rng)
    out = permute.gather_rows(x, jnp.asarray(index), **BLOCKS, interpret=True)
    assert out.shape == (r, h) and out.dtype == dtype
    np.testing.assert_array_equal(_bits(out), _bits(x)[index])


def test_gather_clamps_and_empty(rng):
    x = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
    out = permute.gather_rows(x, jnp.asarray([-3, 9, 2], jnp.int32), **BLOCKS, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x)[[0, 5, 2]])
    assert permute.gather_rows(x, jnp.zeros((0,), jnp.int32), interpret=True).shape == (0, 40)


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int8, jnp.uint16, jnp.int32, jnp.float16])
def test_gather_other_dtypes(rng, dtype):
    """Any dtype is a bitwise copy; bool (no Triton memory type) goes through uint8."""
    x = np.asarray(rng.integers(-100, 100, (9, 70)))
    x = jnp.asarray(x % 2 == 0 if dtype == jnp.bool_ else x, dtype)
    index = rng.integers(0, 9, 23).astype(np.int32)
    out = permute.gather_rows(x, jnp.asarray(index), **BLOCKS, interpret=True)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x)[index])


def _pairs(kind: str, n: int, k: int, r: int, rng):
    position = rng.integers(0, r, (n, k)).astype(np.int32)
    valid = rng.random((n, k)) < 0.6
    if kind == "none_valid":
        valid[:] = False
    elif kind == "one_full":  # one token with all K pairs valid, no other pair
        valid[:] = False
        valid[rng.integers(n)] = True
    elif kind == "same_row":  # every pair reads one row
        position[:] = rng.integers(r)
    return position, valid


def _combine_reference(y, position, valid, dtype=np.float32) -> np.ndarray:
    """Sum over k in order onto 0, as experts.combine_rows (float32) or float64."""
    y = np.asarray(jnp.asarray(y, jnp.float32)).astype(dtype)
    out = np.zeros((position.shape[0], y.shape[1]), dtype)
    for k in range(position.shape[1]):
        out = out + np.where(valid[:, k, None], y[position[:, k]], dtype(0))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "none_valid", "one_full", "same_row"])
@pytest.mark.parametrize("n,h,r", SHAPES)
def test_combine_matches_numpy(rng, dtype, kind, n, h, r):
    k = 3
    position, valid = _pairs(kind, n, k, r, rng)
    y = rng.standard_normal((r, h)).astype(np.float32)
    unread = np.setdiff1d(np.arange(r), position[valid])
    y[unread] = np.nan  # rows no valid pair reads must never leak in
    y = jnp.asarray(y, dtype)
    out = permute.combine_rows(y, jnp.asarray(position), jnp.asarray(valid), out_dtype=jnp.float32,
                               **BLOCKS, interpret=True)
    assert out.shape == (n, h) and out.dtype == jnp.float32
    got = np.asarray(out)
    np.testing.assert_array_equal(got, _combine_reference(y, position, valid))
    want64 = _combine_reference(y, position, valid, np.float64)
    np.testing.assert_allclose(got, want64, rtol=1e-6, atol=1e-6 * k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_out_dtype(rng, dtype):
    position, valid = _pairs("random", 11, 4, 30, rng)
    y = jnp.asarray(rng.standard_normal((30, 72)), dtype)
    out = permute.combine_rows(y, jnp.asarray(position), jnp.asarray(valid), **BLOCKS, interpret=True)
    assert out.dtype == dtype  # default: y's dtype, rounded once from the float32 sum
    want = jnp.asarray(_combine_reference(y, position, valid)).astype(dtype)
    np.testing.assert_array_equal(_bits(out), _bits(want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_experts(rng, dtype):
    """Drop-in for permute_rows and combine_rows on a real sort_pairs order."""
    n, k, h, slots = 24, 4, 96, 6
    slot = jnp.asarray(rng.integers(-1, slots, (n, k)), jnp.int32)
    weight = jnp.asarray(rng.random((n, k)), jnp.float32)
    pairs = experts.sort_pairs(slot, weight, jnp.asarray(rng.random(n) < 0.8), slots)
    x = jnp.asarray(rng.standard_normal((n, h)), dtype)
    rows = permute.gather_rows(x, pairs.row_token, **BLOCKS, interpret=True)
    np.testing.assert_array_equal(_bits(rows), _bits(experts.permute_rows(x, pairs)))
    y = rows * jnp.asarray(rng.standard_normal((n * k, 1)), dtype)
    got = permute.combine_rows(y, pairs.position, pairs.pair_valid, out_dtype=dtype, **BLOCKS,
                               interpret=True)
    np.testing.assert_array_equal(_bits(got), _bits(experts.combine_rows(y, pairs, dtype)))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(block_rows=12), "block_rows.*12"), (dict(block_cols=0), "block_cols.*0"),
    (dict(num_warps=3), "num_warps.*3"), (dict(num_stages=0), "num_stages.*0"),
    (dict(block_rows=1024, block_cols=2048), "2048"),
])
def test_bad_tiling_raises(kwargs, needle):
    x, index = jnp.zeros((4, 8)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=needle):
        permute.gather_rows(x, index, **kwargs)
    with pytest.raises(ValueError, match=needle):
        permute.combine_rows(x, jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2), bool), **kwargs)


def test_bad_shapes_raise():
    x, pos, ok = jnp.zeros((4, 8)), jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2), bool)
    with pytest.raises(ValueError, match=r"x must be 2-D.*\(8,\)"):
        permute.gather_rows(x[0], pos[:, 0])
    with pytest.raises(ValueError, match="index.*float32"):
        permute.gather_rows(x, jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError, match="N=0"):
        permute.gather_rows(x[:0], pos[:, 0])
    with pytest.raises(ValueError, match=r"position.*\(4,\)"):
        permute.combine_rows(x, pos[:, 0], ok[:, 0])
    with pytest.raises(ValueError, match=r"valid.*\(4, 1\)"):
        permute.combine_rows(x, pos, ok[:, :1])
    with pytest.raises(ValueError, match="out_dtype.*int32"):
        permute.combine_rows(x, pos, ok, out_dtype=jnp.int32)


# (N, H, R rows, K): DeepSeek-V3 sizes, and tails in rows and columns.
LOWER_CASES = [(4096, 7168, 4096 * 8, 8), (37, 300, 53, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,r,k", LOWER_CASES)
def test_lowers_for_cuda(dtype, n, h, r, k):
    """Lowering to Triton IR catches most unsupported ops without a GPU."""
    S = jax.ShapeDtypeStruct
    # The Triton lowering asks the device for its compute capability: name one.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        gather = jax.jit(permute.gather_rows).trace(S((n, h), dtype), S((r,), jnp.int32))
        combine = jax.jit(lambda y, p, v: permute.combine_rows(y, p, v, out_dtype=jnp.bfloat16)).trace(
            S((r, h), dtype), S((n, k), jnp.int32), S((n, k), jnp.bool_))
        for traced in (gather, combine):
            assert "__gpu$xla.gpu.triton" in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_permute_rows_pallas_path_and_gradient(rng):
    """experts.permute_rows with the Pallas gather (interpret on CPU) equals XLA's, and so
    does its gradient (scatter-add of the row cotangents)."""
    import wideep_jax.experts as experts

    tokens, top_k, hidden, slots = 12, 3, 40, 5
    slot = jnp.asarray(rng.integers(-1, slots, (tokens, top_k)), jnp.int32)
    weight = jnp.asarray(rng.random((tokens, top_k)), jnp.float32)
    pairs = experts.sort_pairs(slot, weight, jnp.ones((tokens,), bool), slots)
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((tokens * top_k, hidden)), jnp.float32)
    orig = experts.permute_kernels.gather_rows
    experts.permute_kernels.gather_rows = lambda x, i: orig(x, i, interpret=True)
    try:
        got = experts.permute_rows(x, pairs, implementation="pallas")
        g_got = jax.grad(lambda x: jnp.sum(experts.permute_rows(x, pairs, implementation="pallas") * cot))(x)
    finally:
        experts.permute_kernels.gather_rows = orig
    want = experts.permute_rows(x, pairs, implementation="xla")
    g_want = jax.grad(lambda x: jnp.sum(experts.permute_rows(x, pairs, implementation="xla") * cot))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'nope'"):
        experts.permute_rows(x, pairs, implementation="nope")


def test_stable_order_counting_sort_equals_argsort(rng):
    """The counting sort (small plans) and the argsort (large ones) give NumPy's stable
    order exactly, adversarial keys included (all equal, all distinct, only the padding key)."""
    for trial in range(30):
        num_keys = int(rng.integers(1, 70))
        num = int(rng.integers(1, 600))
        key = rng.integers(0, num_keys, num)
        if trial == 0:
            key[:] = 0
        elif trial == 1:
            key[:] = num_keys - 1
        elif trial == 2:
            key = rng.permutation(np.arange(num) % num_keys)
        want = np.argsort(key, kind="stable")
        for counting in (True, False):
            order, position, sizes = experts.stable_order(jnp.asarray(key, jnp.int32), num_keys,
                                                          counting=counting)
            np.testing.assert_array_equal(np.asarray(order), want)
            np.testing.assert_array_equal(np.asarray(position)[want], np.arange(num))
            np.testing.assert_array_equal(np.asarray(sizes), np.bincount(key, minlength=num_keys))
    slot = jnp.asarray(rng.integers(-1, 16, (300, 8)), jnp.int32)
    weight = jnp.asarray(rng.random((300, 8)), jnp.float32)
    small = experts.sort_pairs(slot, weight, jnp.asarray(rng.random(300) < 0.9), 16)
    assert 300 * 8 * 17 <= experts.COUNTING_SORT_MAX_CELLS  # this plan takes the counting sort
    key = np.where(np.asarray(small.pair_valid), np.asarray(slot), 16).reshape(-1)
    np.testing.assert_array_equal(np.asarray(small.row_token), np.argsort(key, kind="stable") // 8)
    np.testing.assert_array_equal(np.asarray(small.group_sizes), np.bincount(key, minlength=17)[:16])


def test_eager_calls_do_not_recompile(rng):
    """Eager calls with new data but the same shapes reuse one compiled program."""
    from moe_helpers import count_compiles

    def call(seed_rows):
        x = jnp.asarray(rng.standard_normal((13, 100)), jnp.float32)
        index = jnp.asarray(rng.integers(0, 13, seed_rows), jnp.int32)
        position, valid = _pairs("random", 11, 3, 37, rng)
        y = jnp.asarray(rng.standard_normal((37, 100)), jnp.float32)
        rows = permute.gather_rows(x, index, **BLOCKS, interpret=True)
        summed = permute.combine_rows(y, jnp.asarray(position), jnp.asarray(valid), **BLOCKS, interpret=True)
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(x)[np.asarray(index)])
        np.testing.assert_array_equal(np.asarray(summed), _combine_reference(y, position, valid))

    for _ in range(2):  # the interpreter compiles its own helpers on first use
        call(37)
    with count_compiles() as compiles:
        call(37)
        call(37)
    assert compiles[0] == 0


def test_routed_experts_input_rules(rng):
    """A weight per token instead of per pair would be read out of bounds (clamped: other
    tokens' weights), silently; mismatched shapes are refused, naming the argument. An int
    mask counts nonzero as valid; a slot past the last counts as none."""
    n, k, h, inter, slots = 6, 2, 8, 4, 3
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    slot = jnp.asarray(rng.integers(-1, slots, (n, k)), jnp.int32)
    weight = jnp.asarray(rng.random((n, k)), jnp.float32)
    valid = jnp.ones((n,), bool)
    w_gate_up = jnp.asarray(rng.standard_normal((slots, h, 2 * inter)), jnp.float32)
    w_down = jnp.asarray(rng.standard_normal((slots, inter, h)), jnp.float32)
    cases = [
        (dict(weight=weight[:, :1]), r"weight has shape \(6, 1\); allowed: .*\(6, 2\)"),
        (dict(valid=valid[:5]), r"valid has shape \(5,\); allowed: \[6\]"),
        (dict(slot=slot[:, 0], weight=weight[:, 0]), r"slot has shape \(6,\); allowed: \[rows, top_k\]"),
        (dict(x=x[:5]), r"x has shape \(5, 8\); allowed: \[6, hidden\]"),
    ]
    for change, needle in cases:
        args = dict(x=x, slot=slot, weight=weight, valid=valid, w_gate_up=w_gate_up, w_down=w_down) | change
        with pytest.raises(ValueError, match=needle):
            experts.routed_experts(**args)
    # An int mask: any nonzero value marks a row that carries a token (not only 1).
    mask = rng.integers(0, 2, n) * rng.integers(1, 5, n)
    mask[0] = 2
    args = dict(x=x, slot=slot, weight=weight, w_gate_up=w_gate_up, w_down=w_down)
    want = experts.routed_experts(**args, valid=jnp.asarray(mask != 0))
    got = experts.routed_experts(**args, valid=jnp.asarray(mask, jnp.int32))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A slot past the last is no slot, as -1 (not a clamped read of another slot's rows).
    past = np.asarray(slot).copy()
    past[rng.random((n, k)) < 0.5] = slots + int(rng.integers(0, 3))
    none = np.where(past >= slots, -1, past)
    args |= dict(valid=valid)
    want = experts.routed_experts(**(args | dict(slot=jnp.asarray(none))))
    got = experts.routed_experts(**(args | dict(slot=jnp.asarray(past))))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_combine_refuses_a_float_mask():
    """A float ``valid`` was cut to bool (0.2 counted its pair), silently."""
    y, pos = jnp.ones((4, 8)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"valid must be bool \(or 0/1 integers\), got float32"):
        permute.combine_rows(y, pos, jnp.full((4, 2), 0.2), interpret=True)
    ints = permute.combine_rows(y, pos, jnp.asarray([[1, 0]] * 4, jnp.int32), **BLOCKS, interpret=True)
    np.testing.assert_array_equal(np.asarray(ints), np.ones((4, 8)))
