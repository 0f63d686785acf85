"""Properties every jaxgen optax transform shares (gmp, amp, dynamic_clip, dp_noise)."""

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
    "dp_noise": lambda: jaxgen.dp_noise(1.0, max_norm=1.0, batch_size=4, key=2),
}
# The same transforms through optax.inject_hyperparams: (factory, arguments, static_args).
INJECTED = {
    "gmp": (jaxgen.gmp, {"num_samples": 2, "sigma": 0.1, "rho": 0.5, "key": 1}, ("num_samples",)),
    "gmp-sequential": (
        jaxgen.gmp, {"num_samples": 2, "sigma": 0.1, "mode": "sequential"}, ("num_samples",)
    ),
    "amp": (jaxgen.amp, {"epsilon": 0.1, "inner_lr": 0.5, "inner_steps": 2}, ()),
    "dynamic_clip": (jaxgen.dynamic_clip, {"initial_norm": 1.0, "alpha": 0.5, "start_step": 1}, ()),
    "dp_noise": (
        jaxgen.dp_noise, {"noise_multiplier": 1.0, "max_norm": 1.0, "batch_size": 4, "key": 2}, ()
    ),
}  # fmt: skip
WRAPPERS = {  # name: transform name -> the optimizer, SGD after the (wrapped) transform
    "plain": lambda name: optax.chain(TRANSFORMS[name](), optax.sgd(0.1)),
    "inject_hyperparams": lambda name: optax.chain(
        optax.inject_hyperparams(INJECTED[name][0], static_args=INJECTED[name][2])(
            **INJECTED[name][1]
        ),
        optax.sgd(0.1),
    ),
    "apply_if_finite": lambda name: optax.chain(
        optax.apply_if_finite(TRANSFORMS[name](), 3), optax.sgd(0.1)
    ),
    # MultiSteps wraps a whole optimizer (inside a chain, optax drops its extra arguments)
    "MultiSteps": lambda name: optax.MultiSteps(
        optax.chain(TRANSFORMS[name](), optax.sgd(0.1)), every_k_schedule=1
    ),
    "masked": lambda name: optax.chain(
        optax.masked(TRANSFORMS[name](), {"w": True, "v": True}), optax.sgd(0.1)
    ),
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


def _two_steps(optimizer, params, batch):
    @jax.jit
    def step(params, state):
        grad_fn = jaxgen.batch_grad_fn(_loss, batch)
        updates, state = optimizer.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    params, state = step(params, state)
    return step(params, state)[0]


@pytest.mark.parametrize("wrapper", [w for w in WRAPPERS if w != "plain"])
@pytest.mark.parametrize("name", INJECTED)
def test_inside_optax_wrappers_the_same_steps(name, wrapper):
    """Each wrapper around each transform takes the steps of the bare transform (no
    hyper-parameter schedule, nothing masked, every gradient finite, k = 1)."""
    params, batch = _params(jnp.float32), _batch(jnp.float32)
    want = _two_steps(WRAPPERS["plain"](name), params, batch)
    got = _two_steps(WRAPPERS[wrapper](name), params, batch)
    chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_inject_hyperparams_as_a_user_would_and_with_a_schedule():
    params, batch = _params(jnp.float32), _batch(jnp.float32)
    grad_fn = jaxgen.batch_grad_fn(_loss, batch)
    # Not jitted: every hyper-parameter is concrete, the defaults (key=0) included.
    gmp = optax.inject_hyperparams(jaxgen.gmp)(sigma=0.03)
    state = gmp.init(params)
    updates, _ = gmp.update(grad_fn(params), state, params, grad_fn=grad_fn)
    chex.assert_trees_all_close(
        updates,
        jaxgen.gmp(sigma=0.03).update(grad_fn(params), state.inner_state, params, grad_fn=grad_fn)[
            0
        ],
    )
    # Jitted, k is traced: the message says what to do.
    with pytest.raises(ValueError, match=r"static_args=\('num_samples',\)"):
        jax.jit(lambda p, s: gmp.update(grad_fn(p), s, p, grad_fn=grad_fn))(params, state)
    # A schedule on σ: the perturbation is 0 at step 0, so the update is the clean gradient.
    scheduled = optax.inject_hyperparams(jaxgen.gmp, static_args="num_samples")(
        sigma=optax.linear_schedule(0.0, 0.1, 10), rho=1.0
    )
    step = jax.jit(lambda p, s: scheduled.update(grad_fn(p), s, p, grad_fn=grad_fn))
    updates, state = step(params, scheduled.init(params))
    chex.assert_trees_all_close(updates, grad_fn(params), rtol=1e-6)
    assert float(state.hyperparams["sigma"]) == 0.0


def test_dp_noise_has_the_standard_deviation_sigma_c_over_b():
    noise = jaxgen.dp_noise(2.0, max_norm=0.5, batch_size=4, key=0)
    zeros = jnp.zeros(100_000)
    draws, _ = noise.update(zeros, noise.init(zeros))
    np.testing.assert_allclose(np.std(draws), 2.0 * 0.5 / 4, rtol=0.01)
    with pytest.raises(ValueError, match="noise_multiplier must be"):
        jaxgen.dp_noise(-1.0, max_norm=1.0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        jaxgen.dp_noise(1.0, max_norm=1.0, batch_size=0)
