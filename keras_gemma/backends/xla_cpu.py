"""Low-precision generation on JAX's CPU backend: a rewrite of the traced
program, so the model's Keras code stays as written.

XLA's CPU compiler runs a bfloat16 dot that returns bfloat16 several times
slower than one that returns float32, and its one-row (decode step) product
converts the weights to a float32 copy, which inside the decode loop it
hoists out as a copy of every weight. `accumulate_in_float32(fn)` traces
`fn` and re-emits every low-precision `dot_general` with a float32 result,
rounded back to its own dtype (values match the plain program's to
rounding); a one-row product becomes a multiply-reduce when the weight is
tall (its fused loop reads bfloat16 as stored) and a two-row product
otherwise (the second row zero: XLA's kernel for several rows reads the
weights as stored). Table lookups and multiply-reduces take their operands
through an optimization barrier, so no conversion can leave the loop.

Example:
>>> import jax, jax.numpy as jnp
>>> f = accumulate_in_float32(lambda w, x: x @ w)
>>> w, x = jnp.ones((4, 3), jnp.bfloat16), jnp.ones((2, 4), jnp.bfloat16)
>>> y = jax.jit(f)(w, x)
>>> str(y.dtype), float(y[0, 0])
('bfloat16', 4.0)
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def applies(model):
    """Whether `model` computes in low precision on JAX's CPU backend."""
    return jnp.dtype(model.compute_dtype) in _LOW_PRECISION and jax.default_backend() == "cpu"


def accumulate_in_float32(fn):
    """`fn`, re-emitted as the module docstring says; same inputs and outputs."""

    def rewritten(*args):
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*shapes)
        outs = _evaluate(closed, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return rewritten


def _evaluate(closed, args):
    jaxpr, env = closed.jaxpr, {}

    def read(var):
        return var.val if isinstance(var, core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        params = {name: _rewrite_param(value) for name, value in eqn.params.items()}
        name = eqn.primitive.name
        low = getattr(inputs[0], "dtype", None) in _LOW_PRECISION if inputs else False
        if name == "gather" and low:
            inputs[:2] = lax.optimization_barrier(tuple(inputs[:2]))
        if name == "dot_general" and low:
            product = _dot_in_float32(*inputs, params)
            outputs = [lax.convert_element_type(product, eqn.outvars[0].aval.dtype)]
        else:
            # As `jax.core.eval_jaxpr` binds (call primitives adjust their params).
            outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(params))
            outputs = outputs if eqn.primitive.multiple_results else [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(v) for v in jaxpr.outvars]


def _free_size(x, contracting, batch):
    return math.prod(d for i, d in enumerate(x.shape) if i not in (*contracting, *batch))


def _dot_in_float32(lhs, rhs, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    params = {**params, "preferred_element_type": jnp.float32}
    rows = _free_size(lhs, lc, lb), _free_size(rhs, rc, rb)
    if lb or 1 not in rows or rows == (1, 1):
        return lax.dot_general(lhs, rhs, **params)
    out_shape = [d for i, d in enumerate(lhs.shape) if i not in lc]
    out_shape += [d for i, d in enumerate(rhs.shape) if i not in rc]
    if rows[1] == 1:  # one row times a weight: the row first
        lhs, rhs, lc, rc = rhs, lhs, rc, lc
    free = [i for i in range(rhs.ndim) if i not in rc]
    weight = lax.transpose(rhs, (*free, *rc)).reshape(max(rows), -1)  # [out, in]
    row = lax.transpose(lhs, (*lc, *(i for i in range(lhs.ndim) if i not in lc))).reshape(1, -1)
    if weight.shape[0] >= 4 * weight.shape[1]:  # tall: multiply-reduce
        weight, row = lax.optimization_barrier((weight, row))
        product = jnp.sum(weight.astype(jnp.float32) * row.astype(jnp.float32), axis=-1)
    else:
        two_rows = jnp.concatenate([row, jnp.zeros_like(row)])
        product = jnp.einsum("ri,oi->ro", two_rows, weight, preferred_element_type=jnp.float32)[0]
    # The row's free axes are all 1, so the weight's order is the output's.
    return product.reshape(out_shape)


def _rewrite_param(value):
    """Sub-programs (loop bodies, branches, nested jits) are rewritten too."""
    if isinstance(value, core.ClosedJaxpr):
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in value.jaxpr.invars]
        return jax.make_jaxpr(lambda *args: _evaluate(value, args))(*avals)
    if isinstance(value, tuple) and value and all(isinstance(v, core.ClosedJaxpr) for v in value):
        return tuple(_rewrite_param(v) for v in value)
    return value
