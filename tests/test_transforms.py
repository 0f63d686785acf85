"""Properties every jaxgen optax transform shares (gmp, amp, dynamic_clip)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgen


def _loss(params, z):
    return 0.5 * jnp.sum((params["w"] - z) ** 2) + 0.25 * jnp.sum(params["v"] ** 4)


TRANSFORMS = {
    "gmp": lambda: jaxgen.gmp(num_samples=2, sigma=0.1, rho=0.5, key=1),
    "gmp-sequential": lambda: jaxgen.gmp(num_samples=2, sigma=0.1, mode="sequential"),
    "amp": lambda: jaxgen.amp(epsilon=0.1, inner_lr=0.5, inner_steps=2),
    "dynamic_clip": lambda: jaxgen.dynamic_clip(initial_norm=1.0, alpha=0.5, start_step=1),
}


def _params(dtype):
    return {"w": jnp.ones(3, dtype), "v": jnp.full((2, 2), 0.5, dtype)}


def _batch(dtype):
    return jnp.arange(12, dtype=dtype).reshape(4, 3) / 10


def _signature(tree):
    return jax.tree_util.tree_structure(tree), [
        (x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)
    ]


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_in_optax_chain_under_jit_without_recompiling(name, dtype):
    optimizer = optax.chain(TRANSFORMS[name](), optax.sgd(0.1))
    params, batch = _params(dtype), _batch(dtype)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        grad_fn = jaxgen.batch_grad_fn(_loss, batch)
        updates, state = optimizer.update(
            grad_fn(params), state, params, grad_fn=grad_fn, unknown_extra=3.0
        )
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    new_params, new_state = step(params, state)
    newer_params, newer_state = step(new_params, new_state)
    assert len(traces) == 1
    assert _signature(new_params) == _signature(params) == _signature(newer_params)
    assert _signature(new_state) == _signature(state) == _signature(newer_state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(newer_params))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_init_accepts_shape_dtype_structs(name):
    transform = TRANSFORMS[name]()
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params(jnp.float32)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(
        transform.init(abstract), transform.init(_params(jnp.float32))
    )


@pytest.mark.parametrize("name", ["gmp", "amp"])
def test_missing_params_or_grad_fn_is_a_clear_error(name):
    transform = TRANSFORMS[name]()
    params = _params(jnp.float32)
    state = transform.init(params)
    grad_fn = jaxgen.batch_grad_fn(_loss, _batch(jnp.float32))
    with pytest.raises(ValueError, match="needs params"):
        transform.update(grad_fn(params), state, grad_fn=grad_fn)
    with pytest.raises(ValueError, match="needs grad_fn="):
        transform.update(grad_fn(params), state, params)


def test_nnx_optimizer_forwards_grad_fn():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax.chain(jaxgen.gmp(num_samples=2), optax.sgd(0.1)), wrt=nnx.Param
    )
    graphdef, _ = nnx.split(model, nnx.Param)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}

    def loss_fn(params, z):
        return 0.5 * jnp.sum((nnx.merge(graphdef, params)(z["x"]) - z["y"]) ** 2)

    params = nnx.state(model, nnx.Param)
    kernel_before = np.array(model.kernel[...])
    grad_fn = jaxgen.batch_grad_fn(loss_fn, batch)
    clean = grad_fn(params)
    optimizer.update(model, clean, grad_fn=grad_fn)
    # SGD moved the kernel, by something other than the clean gradient step alone.
    moved = np.array(model.kernel[...]) - kernel_before
    assert np.abs(moved).max() > 0
    assert not np.allclose(moved, -0.1 * np.array(clean["kernel"][...]))


def test_batch_grad_fn_drives_optax_sam_in_opaque_mode():
    """optax's SAM calls ``grad_fn(params, i)``; the result is SAM's update by hand."""
    params, batch = _params(jnp.float32), _batch(jnp.float32)
    rho, lr = 0.05, 0.1
    sam = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    grad_fn = jaxgen.batch_grad_fn(_loss, batch)

    @jax.jit
    def step(params, state):
        updates, state = sam.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    new_params, _ = step(params, sam.init(params))
    g = grad_fn(params)
    ascent = optax.tree.scale(rho / optax.tree.norm(g), g)
    expected = optax.tree.add_scale(params, -lr, grad_fn(optax.tree.add(params, ascent)))
    chex.assert_trees_all_close(new_params, expected, rtol=1e-5)
