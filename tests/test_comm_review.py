"""Communication layer, CPU side: review regressions.

* The FFI primitive's outputs vary over the manual axes its inputs vary over
  (shard_map's check_vma), so autodiff through the FFI backends' custom_vjp works
  there; checked with a stand-in target lowered for CPU as the identity.
* A dispatch plan made for another EP size (or partial sums of another layout,
  or another mesh axis for the FFI backends) is refused, not split silently.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from test_comm_ffi import dispatch_combine_loss
from test_dispatch import dyadic_tokens, random_slots, random_valid, random_weights
from wideep_jax.comm import XlaAllToAll
from wideep_jax.comm.ffi_backend import FfiAllToAll
from wideep_jax.comm.ffi_primitive import _primitive, ordered_ffi_call
from wideep_jax.dispatch import make_dispatch_plan

R, T, K, H, SPR = 4, 12, 4, 8, 3
IDENTITY = "wideep_review_identity"  # a stand-in custom call: CPU lowering = identity


def _mesh(shape=(R,), names=("ep",)):
    return jax.make_mesh(shape, names, devices=jax.devices()[:int(np.prod(shape))])


def _through(*arrays):
    if not getattr(_through, "registered", False):
        mlir.register_lowering(_primitive(IDENTITY), mlir.lower_fun(lambda *a, **_: a, multiple_results=True),
                               platform="cpu")
        _through.registered = True
    return ordered_ffi_call(IDENTITY, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays], *arrays)


class _PrimitiveStandIn(FfiAllToAll):
    """The FFI backends' shape: forward results come out of an ordered_ffi_call."""

    name = "stand-in"

    def __init__(self, mesh, axis):
        super().__init__(mesh, axis)
        self._xla, self._axis = XlaAllToAll(), axis

    def _dispatch(self, x, plan):
        return _through(*self._xla.dispatch(x, plan, axis_name=self._axis))

    def _combine(self, partial_sums, plan, recv_count):  # like nvlink: the call returns [T, H]
        return _through(self._xla.combine(partial_sums, plan, recv_count, axis_name=self._axis))[0]


def test_ffi_outputs_vary_like_inputs_so_grads_work_with_check_vma(rng):
    mesh = _mesh()
    sharding = NamedSharding(mesh, P("ep"))
    x = dyadic_tokens(rng, (R * T, H))
    slots = np.concatenate([random_slots(rng, "random", T, K, R, SPR) for _ in range(R)])
    valid = np.concatenate([random_valid(rng, "random", T) for _ in range(R)])
    w = random_weights(rng, slots.shape)
    args = [jax.device_put(jnp.asarray(a), sharding) for a in (x, w, slots, valid)]

    def grads(comm):  # shard_map's default check_vma=True
        grad = jax.grad(dispatch_combine_loss, argnums=(1, 2))
        return jax.jit(jax.shard_map(lambda *a: grad(comm, *a), mesh=mesh,
                                     in_specs=(P("ep"),) * 4, out_specs=(P("ep"), P("ep"))))

    got, want = grads(_PrimitiveStandIn(mesh, "ep"))(*args), grads(XlaAllToAll())(*args)
    for g, e, name in zip(got, want, ("dx", "dweights")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=2e-5, err_msg=name)

    # A per-device output returned as replicated is caught, as for any varying value.
    def body(x):
        return _through(x)[0]

    with pytest.raises(ValueError, match="ep"):
        jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P())).trace(args[0])
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(args[0])
    np.testing.assert_array_equal(np.asarray(out), x)


def _plan_body(comm, num_ranks, axis="ep", capacity_cut=0):
    def body(x, slots, w, valid):
        plan = make_dispatch_plan(slots, w, valid, num_ranks=num_ranks, slots_per_rank=SPR)
        recv = comm.dispatch(x, plan, axis_name=axis)
        partial = recv.x[:, : recv.x.shape[1] - capacity_cut]
        return comm.combine(partial, plan, recv.count, axis_name=axis)
    return body


def _trace(body, mesh, axis="ep"):
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(axis),) * 4, out_specs=P(axis), check_vma=False))
    n = mesh.shape[axis] * T
    sharding = NamedSharding(mesh, P(axis))
    specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding)
             for s, d in (((n, H), jnp.float32), ((n, K), jnp.int32), ((n, K), jnp.float32), ((n,), jnp.bool_))]
    return f.trace(*specs)


@pytest.mark.parametrize("num_ranks", [2 * R, R // 2])
def test_xla_backend_refuses_a_plan_for_another_ep_size(num_ranks):
    # 2R used to run: each rank got two "ranks'" rows and slots (another rank's experts), silently.
    with pytest.raises(ValueError, match=rf"num_ranks={num_ranks}.*'ep' has {R} devices"):
        _trace(_plan_body(XlaAllToAll(), num_ranks), _mesh())


def test_xla_combine_refuses_partial_sums_of_another_capacity():
    # Fewer rows than the plan's capacity: the gather clamped the plan's rows into them, silently.
    with pytest.raises(ValueError, match=rf"partial sums have shape \({R}, {T - 1}, {H}\).*capacity={T}"):
        _trace(_plan_body(XlaAllToAll(), R, capacity_cut=1), _mesh())
    _trace(_plan_body(XlaAllToAll(), R), _mesh())  # the matching layout traces


def test_ffi_backend_refuses_another_axis_plan_size_or_layout():
    # A 2x2 mesh: the backend is built for "ep"; a dispatch along "dp" (the same size) would
    # have exchanged along "ep", silently.
    mesh = _mesh((2, 2), ("dp", "ep"))
    comm = _PrimitiveStandIn(mesh, "ep")
    with pytest.raises(ValueError, match=r"axis_name='dp'.*built for the mesh axis 'ep'; allowed: 'ep'"):
        _trace(_plan_body(comm, 2, axis="dp"), mesh, axis="dp")
    with pytest.raises(ValueError, match=r"num_ranks=4.*'ep' has 2 devices"):
        _trace(_plan_body(comm, 4), mesh)
    with pytest.raises(ValueError, match=r"partial sums have shape"):
        _trace(_plan_body(comm, 2, capacity_cut=1), mesh)
    _trace(_plan_body(comm, 2), mesh)


def test_dispatch_backward_runs_its_two_combines_one_after_the_other(rng):
    """The dispatch's backward pass combines the row and the weight cotangents: two custom
    calls with no data between them, which XLA could run as parallel branches (a command
    buffer in concurrent mode), two all-to-all kernels waiting on each other's peers. The
    second must depend on the first's output."""
    mesh = _mesh()
    comm = _PrimitiveStandIn(mesh, "ep")
    grad = jax.grad(dispatch_combine_loss, argnums=(1, 2))
    f = jax.shard_map(lambda *a: grad(comm, *a), mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=(P("ep"), P("ep")))
    sharding = NamedSharding(mesh, P("ep"))
    specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in
             (((R * T, H), jnp.float32), ((R * T, K), jnp.float32), ((R * T, K), jnp.int32), ((R * T,), jnp.bool_))]
    (body,) = [e.params["jaxpr"] for e in jax.make_jaxpr(f)(*specs).jaxpr.eqns if e.primitive.name == "shard_map"]
    body = getattr(body, "jaxpr", body)
    calls, depends = [], {}  # var -> indexes of the custom calls it depends on
    for eqn in body.eqns:
        before = frozenset().union(*(depends.get(v, frozenset()) for v in eqn.invars if not hasattr(v, "val")))
        if eqn.primitive.name == IDENTITY:
            calls.append(before)
            before = before | {len(calls) - 1}
        for v in eqn.outvars:
            depends[v] = before
    # forward dispatch, forward combine, combine's backward (a dispatch), then the two combines
    assert len(calls) == 5, len(calls)
    assert 3 in calls[4], "the weight cotangents' combine does not wait for the rows' combine"
