import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen._chunks import convolves, loops_are_slow, map_in_rows


def _conv(w, x):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")


def _dense(w, x):
    return jnp.tanh(x @ w)


def _scanned(f):
    return lambda w, x: jax.lax.scan(lambda c, _: (c + jnp.sum(f(w, x)), None), 0.0, None, 2)[0]


def _branched(f):
    return lambda w, x: jax.lax.cond(True, f, lambda w, x: x, w, x)


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit, jax.checkpoint, _scanned, _branched])
def test_convolutions_are_found_inside_calls_remat_scans_and_branches(wrap):
    w, x = jnp.ones((1, 1, 3, 3)), jnp.ones((2, 1, 5, 5))
    loss = lambda w: jnp.sum(wrap(_conv)(w, x))  # noqa: E731
    assert convolves(jax.make_jaxpr(jax.grad(loss))(w).jaxpr) is True
    assert loops_are_slow(jax.grad(loss), w) is (jax.default_backend() == "cpu")


def test_dense_programs_may_loop():
    w, x = jnp.ones((3, 3)), jnp.ones((2, 3))
    grad = jax.grad(lambda w: jnp.sum(jax.jit(jax.checkpoint(_dense))(w, x)))
    assert not convolves(jax.make_jaxpr(grad)(w).jaxpr)
    assert not loops_are_slow(grad, w)


def test_map_in_rows_is_vmap_in_any_row_width_unrolled_or_looped():
    xs = jnp.arange(40.0)
    for width in (1, 3, 7, 40, 50):  # 40 rows of one: more than MAX_UNROLLED, a loop
        np.testing.assert_allclose(map_in_rows(jnp.sin, xs, width), jnp.sin(xs))


def _loops(fn, *args) -> bool:
    names = {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}
    return bool(names & {"scan", "while"})


def test_rows_are_unrolled_on_a_cpu_only_and_up_to_max_unrolled():
    xs = jnp.arange(12.0)
    for unroll in (True, False):
        rows = lambda xs, unroll=unroll: map_in_rows(jnp.sin, xs, 4, unroll=unroll)  # noqa: E731
        assert _loops(rows, xs) is not unroll
        np.testing.assert_allclose(rows(xs), jnp.sin(xs), rtol=1e-6)
    on_cpu = jax.default_backend() == "cpu"
    assert _loops(lambda xs: map_in_rows(jnp.sin, xs, 4), xs) is not on_cpu
    assert _loops(lambda xs: map_in_rows(jnp.sin, xs, 1), jnp.arange(40.0))  # 40 > MAX_UNROLLED
