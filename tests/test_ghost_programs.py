"""Ghost norms on programs written the way JAX users write models.

Every loss here is a valid pure per-example loss; ``"auto"`` and ``"ghost"`` must give
the numbers of a float64 ``vmap(grad)`` oracle (never a traceback), and ``"ghost"`` must
warn exactly when it materialises a parameter no rule covers.
"""

import functools
import warnings

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
import jaxgen._ghost as ghost_module
from jaxgen._chunks import _inner_jaxprs
from jaxgen._ghost import rules

B, D, H, V = 6, 5, 4, 7


def _oracle(loss_fn, params, batch):
    """Per-example squared norms, dispersion, mean and the per-example gradients (per
    leaf), from float64 per-example gradients."""
    with jax.enable_x64(True):
        to64 = lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        params64 = jax.tree_util.tree_map(to64, params)
        batch64 = jax.tree_util.tree_map(to64, batch)
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params64, batch64)
        flat = np.concatenate(
            [np.asarray(g).reshape(B, -1) for g in jax.tree_util.tree_leaves(grads)], axis=1
        )
        mean = jax.tree_util.tree_map(lambda g: np.asarray(g).mean(axis=0), grads)
        leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    residuals = flat - flat.mean(axis=0)
    return np.sum(flat**2, axis=1), np.sum(residuals**2) / B, mean, leaves


def _check(loss_fn, params, batch, *, warns: bool, rtol=2e-4):
    sq_norms, dispersion, mean, grads = _oracle(loss_fn, params, batch)
    ghost_module._warn_once.cache_clear()  # each message is given once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ghost = jaxgen.gradient_dispersion(loss_fn, params, batch, method="ghost")
    messages = [str(w.message) for w in caught if "method='ghost'" in str(w.message)]
    assert bool(messages) == warns, messages
    auto = jaxgen.gradient_dispersion(loss_fn, params, batch)
    for stats in (ghost, auto):
        np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(stats.dispersion, dispersion, rtol=rtol, atol=1e-7)
        for got, want in zip(*map(jax.tree_util.tree_leaves, (stats.grad, mean)), strict=True):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)
    _check_clipped(loss_fn, params, batch, grads, rtol)
    return messages


def _check_clipped(loss_fn, params, batch, grads, rtol, scaled_atol=0.0):
    """``clipped_grad`` (ghost) against the clipped mean of the float64 per-example
    gradients ``grads`` (per leaf, from ``_oracle``), half the examples clipped
    (``test_clipped.py``); ``scaled_atol``: an absolute tolerance as a fraction of each
    leaf's largest entry (low precision)."""
    from test_clipped import _median

    sq_norms = sum(np.sum(g.reshape(B, -1) ** 2, axis=1) for g in grads)
    norms = np.sqrt(sq_norms)
    max_norm = _median(norms) if np.ptp(norms) > 0 else float(norms[0]) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings are _check's subject
        got = jaxgen.clipped_grad(loss_fn, params, batch, max_norm=max_norm, method="ghost")
    factors = np.minimum(1.0, max_norm / norms)
    want = [np.tensordot(factors, g, axes=1) / B for g in grads]
    np.testing.assert_allclose(got.sq_norms, sq_norms, rtol=rtol, atol=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(got.grad), want, strict=True):
        atol = max(1e-6, scaled_atol * float(np.max(np.abs(w))))
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


def _normal(key, *shape):
    return jax.random.normal(jax.random.key(key), shape)


BATCH = {"x": _normal(0, B, D), "y": jnp.array([0, 1, 2, 3, 0, 1])}


def _xent(logits, y):
    return -jax.nn.log_softmax(logits)[y]


def test_scan_over_stacked_layers_with_a_mask_built_inside_the_loss():
    params = {"w": _normal(1, 3, D, D) / 2, "out": _normal(2, D, H)}

    def loss(p, z):
        mask = jnp.arange(D) % 2 == 0  # a constant the scan body closes over

        def layer(h, w):
            return jnp.where(mask, jnp.tanh(h @ w), h), None

        h, _ = jax.lax.scan(layer, z["x"], p["w"])
        return _xent(h @ p["out"], z["y"])

    _check(loss, params, BATCH, warns=False)  # the scan is opened: a dense rule per layer
    assert _rules_used(loss, params, BATCH) == {"dense"}


def test_fori_loop_with_a_literal_counter():
    """The loop closes over ``w``: tied, its rows of the three iterations in one product."""
    params = {"w": _normal(3, D, D) / 3, "out": _normal(4, D, H)}

    def loss(p, z):
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]) + i, z["x"])
        return _xent(h @ p["out"], z["y"])

    _check(loss, params, BATCH, warns=False)
    assert _rules_used(loss, params, BATCH) == {"dense"}


def test_checkpointed_blocks_keep_the_fast_path():
    params = {"w1": _normal(5, D, D), "b1": jnp.zeros(D), "w2": _normal(6, D, H)}

    @jax.checkpoint
    def block(w, b, x):
        return jax.nn.relu(x @ w + b)

    def loss(p, z):
        return _xent(block(p["w1"], p["b1"], z["x"]) @ p["w2"], z["y"])

    _check(loss, params, BATCH, warns=False)
    program = str(
        jax.make_jaxpr(lambda p, b: jaxgen.gradient_dispersion(loss, p, b, method="ghost"))(
            params, BATCH
        )
    )
    assert "remat" in program or "checkpoint[" in program  # still recomputed, not stored


def test_custom_vjp_keeps_its_own_gradient():
    @jax.custom_vjp
    def clipped_tanh(x):
        return jnp.tanh(x)

    clipped_tanh.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (jnp.clip(g, -0.1, 0.1),))
    params = {"w": _normal(7, D, D), "out": _normal(8, D, H)}

    def loss(p, z):
        return _xent(clipped_tanh(z["x"] @ p["w"]) @ p["out"], z["y"])

    _check(loss, params, BATCH, warns=False)


def test_custom_vjp_that_takes_the_parameters():
    @jax.custom_vjp
    def layer(w, x):
        return jnp.tanh(x @ w)

    def forward(w, x):
        return layer(w, x), (w, x)

    def backward(res, g):
        w, x = res
        d = g * (1 - jnp.tanh(x @ w) ** 2)
        return 0.5 * jnp.outer(x, d), d @ w.T  # a deliberately different parameter rule

    layer.defvjp(forward, backward)
    params = {"w": _normal(9, D, D), "out": _normal(10, D, H)}
    _check(lambda p, z: _xent(layer(p["w"], z["x"]) @ p["out"], z["y"]), params, BATCH, warns=True)


def test_where_with_a_constant_other_branch():
    params = {"w": _normal(11, D, H), "b": _normal(12, H)}

    def loss(p, z):
        logits = jnp.where(z["x"][:H] > 0, z["x"] @ p["w"], -1.0) + p["b"]
        return _xent(logits, z["y"])

    _check(loss, params, BATCH, warns=False)


@pytest.mark.parametrize("mode", ["promise_in_bounds", "clip", "fill"])
def test_gathers_in_every_mode_with_ids_out_of_range(mode):
    ids = jnp.array([[0, 3, V, 3], [V + 2, 1, 1, 6], [2, 2, 2, 2], [V, V, 0, 5], [6, 6, 1, 0],
                     [4, V + 1, 3, 3]])  # fmt: skip
    batch = {"ids": ids, "y": BATCH["y"]}
    params = {"table": _normal(13, V, D), "out": _normal(14, D, H)}

    def loss(p, z):
        rows = p["table"].at[z["ids"]].get(mode=mode, fill_value=0.0)
        return _xent(jnp.tanh(rows).mean(0) @ p["out"], z["y"])

    _check(loss, params, batch, warns=False)


def test_dynamic_slice_with_a_literal_start_index():
    params = {"w": _normal(15, D, 2 * D), "out": _normal(16, D, H)}

    def loss(p, z):
        start = jnp.argmax(z["x"]) % D  # example-dependent column, literal row 0
        w = jax.lax.dynamic_slice(p["w"], (0, start), (D, D))
        return _xent(jnp.tanh(z["x"] @ w) @ p["out"], z["y"])

    _check(loss, params, BATCH, warns=True)


def test_weight_normalisation_and_tied_weights():
    params = {"v": _normal(17, D, H), "g": jnp.ones(H) * 2, "table": _normal(18, V, D)}

    def loss(p, z):
        w = p["g"] * p["v"] / jnp.linalg.norm(p["v"], axis=0)
        h = p["table"][z["y"] + 2] + z["x"]  # embedding ...
        scores = jnp.tanh(h @ w) @ w.T @ p["table"].T  # ... tied with the output
        return _xent(scores, z["y"])

    _check(loss, params, BATCH, warns=True)


def test_dot_general_with_batch_dimensions_goes_to_the_exact_path():
    params = {"heads": _normal(19, 2, D, H)}

    def loss(p, z):
        x = jnp.stack([z["x"], -z["x"]])
        return _xent(jnp.tanh(jnp.einsum("hd,hdk->hk", x, p["heads"])).sum(0), z["y"])

    _check(loss, params, BATCH, warns=True)


@pytest.mark.parametrize("order", ["param_minus_data", "data_minus_param"])
def test_subtracted_biases_keep_their_sign(order):
    params = {"w": _normal(20, D, H), "b": _normal(21, 1, H)}

    def loss(p, z):
        y = (z["x"] @ p["w"])[None]
        return _xent((p["b"] - y if order == "param_minus_data" else y - p["b"])[0], z["y"])

    _check(loss, params, BATCH, warns=False)


def test_bfloat16_parameters():
    params = {"w": _normal(22, D, H).astype(jnp.bfloat16), "b": jnp.zeros(H, jnp.bfloat16)}

    def loss(p, z):
        return _xent((z["x"].astype(jnp.bfloat16) @ p["w"] + p["b"]).astype(jnp.float32), z["y"])

    sq_norms, dispersion, _, grads = _oracle(loss, params, BATCH)
    stats = jaxgen.gradient_dispersion(loss, params, BATCH)
    np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=3e-2)
    np.testing.assert_allclose(stats.dispersion, dispersion, rtol=3e-2)
    _check_clipped(loss, params, BATCH, grads, rtol=3e-2, scaled_atol=2e-2)


def test_float64_parameters_give_float64_results():
    with jax.enable_x64(True):
        params = {"w": _normal(23, D, H).astype(jnp.float64), "b": jnp.zeros(H, jnp.float64)}
        batch = {"x": BATCH["x"].astype(jnp.float64), "y": BATCH["y"]}

        def loss(p, z):
            return _xent(z["x"] @ p["w"] + p["b"], z["y"])

        for method in ("ghost", "auto", "vmap"):
            stats = jaxgen.gradient_dispersion(loss, params, batch, method=method)
            assert stats.dispersion.dtype == stats.sq_norms.dtype == jnp.float64, method
        sq_norms, dispersion, _, grads = _oracle(loss, params, batch)
        np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=1e-12)
        np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-12)


def test_auto_is_exact_when_the_mean_gradient_dominates_by_1e8():
    """g_i = x_i δ with x_i = c + ε_i: ‖ḡ‖² / dispersion ≈ c²/Var(ε) = 1e8."""
    c, spread = 1e3, 0.1
    x = c + spread * _normal(24, B, D)
    params = {"w": jnp.ones((D, 1))}

    def loss(p, z):
        return (z["x"] @ p["w"])[0]  # δ = 1: g_i = x_i exactly

    batch = {"x": x}
    sq_norms, dispersion, _, grads = _oracle(loss, params, batch)
    assert np.sum(np.mean(np.asarray(x, np.float64), 0) ** 2) / dispersion > 1e7
    stats = jaxgen.gradient_dispersion(loss, params, batch)
    np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-3)
    np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=1e-6)
    _check_clipped(loss, params, batch, grads, rtol=1e-6)  # no cancellation


def test_flax_linen_and_equinox_models():
    class LinenMLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(H)(jax.nn.gelu(linen.LayerNorm()(linen.Dense(D)(x))))

    model = LinenMLP()
    variables = model.init(jax.random.key(25), BATCH["x"][0])
    _check(lambda v, z: _xent(model.apply(v, z["x"]), z["y"]), variables, BATCH, warns=False)

    mlp = eqx.nn.MLP(D, H, width_size=6, depth=2, key=jax.random.key(26))
    params, static = eqx.partition(mlp, eqx.is_inexact_array)

    def loss(p, z):
        return _xent(eqx.combine(p, static)(z["x"]), z["y"])

    _check(loss, params, BATCH, warns=False)


def test_a_program_the_interpreter_cannot_follow_falls_back_to_vmap(monkeypatch):
    def broken(use, x, delta):
        raise NotImplementedError("no such rule")

    monkeypatch.setitem(rules.RULES, "dense", rules.Rule(rules.is_dense, sq_norms=broken))
    params = {"w": _normal(27, D, H)}

    def loss(p, z):  # a fresh function: nothing cached from the other tests
        return _xent(z["x"] @ p["w"], z["y"])

    with pytest.warns(UserWarning, match="cannot follow this loss .* method='vmap' instead"):
        stats = jaxgen.gradient_dispersion(loss, params, BATCH, method="ghost")
    _, dispersion, _, grads = _oracle(loss, params, BATCH)
    np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxgen.gradient_dispersion(loss, params, BATCH)  # "auto": silently


CONVS = {  # name: (input shape of one example, kernel shape, conv keyword arguments)
    "nhwc same": ((1, 9, 9, 3), (3, 3, 3, 4), dict(window_strides=(1, 1), padding="SAME")),
    "strided valid": ((1, 9, 8, 3), (3, 2, 3, 4), dict(window_strides=(2, 3), padding="VALID")),
    "asymmetric and negative padding": (
        (1, 8, 8, 2), (3, 3, 2, 3), dict(window_strides=(1, 2), padding=((2, 0), (1, -1)))
    ),
    "dilated kernel": ((1, 9, 9, 2), (2, 3, 2, 3), dict(window_strides=(1, 1), padding="SAME",
                                                        rhs_dilation=(2, 2))),
    "transposed (input dilation)": ((1, 5, 5, 2), (3, 3, 2, 3), dict(
        window_strides=(1, 1), padding=((2, 2), (1, 2)), lhs_dilation=(2, 2))),
    "depthwise": ((1, 8, 8, 4), (3, 3, 1, 8), dict(window_strides=(2, 2), padding="SAME",
                                                    feature_group_count=4)),
    "grouped, two images per example": ((2, 6, 6, 4), (3, 3, 2, 6), dict(
        window_strides=(1, 1), padding="SAME", feature_group_count=2)),
    "nchw / oihw": ((1, 3, 7, 7), (4, 3, 3, 3), dict(window_strides=(1, 1), padding="SAME",
                                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "1-d": ((1, 11, 3), (4, 3, 5), dict(window_strides=(2,), padding="VALID",
                                        dimension_numbers=("NWC", "WIO", "NWC"))),
    "3-d": ((1, 5, 5, 4, 2), (2, 3, 2, 2, 3), dict(window_strides=(1, 2, 1), padding="SAME",
                                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
}  # fmt: skip


def _conv_case(name):
    """``(loss, params, batch)`` of a one-convolution model of ``CONVS[name]``, with a
    fresh loss function (nothing cached from another test)."""
    shape, kernel_shape, kwargs = CONVS[name]
    kwargs = {"dimension_numbers": ("NHWC", "HWIO", "NHWC"), **kwargs}
    params = {"kernel": _normal(30, *kernel_shape) / 3}
    batch = {"x": _normal(31, B, *shape), "y": BATCH["y"]}

    def loss(p, z):
        out = jax.lax.conv_general_dilated(z["x"], p["kernel"], **kwargs)
        return _xent(jnp.tanh(out).reshape(-1)[:H] * 3, z["y"])

    return loss, params, batch


@pytest.mark.parametrize("name", CONVS)
def test_convolution_kernels_of_every_shape_get_exact_per_example_gradients(name):
    loss, params, batch = _conv_case(name)
    _check(loss, params, batch, warns=False, rtol=5e-4)
    plan_rules = _rules_used(loss, params, batch)
    assert plan_rules == {"conv"}, plan_rules
    # ḡ comes from the per-example kernel gradients: the forward convolution is the only one
    ghost = jax.make_jaxpr(lambda p, b: jaxgen.gradient_dispersion(loss, p, b, method="ghost"))
    assert _count_convolutions(ghost(params, batch).jaxpr) == 1


@pytest.mark.parametrize(
    "name",
    ["strided valid", "transposed (input dilation)", "grouped, two images per example"],
)
def test_convolution_kernel_gradients_formed_a_chunk_of_examples_at_a_time(name, monkeypatch):
    # Big batches on a CPU take their examples a few at a time (cache-sized chunks): force
    # chunks of one example here (``in_example_chunks`` is tested with bigger ones).
    monkeypatch.setattr(rules, "CONV_CACHED_ELEMENTS", 0)
    monkeypatch.setattr(rules, "CONV_CHUNK_ELEMENTS", 1)
    loss, params, batch = _conv_case(name)
    _check(loss, params, batch, warns=False, rtol=5e-4)
    ghost = jax.make_jaxpr(lambda p, b: jaxgen.gradient_dispersion(loss, p, b, method="ghost"))
    assert " scan[" in str(ghost(params, batch))  # the fori_loop


def _count_convolutions(jaxpr):
    return sum(
        (eqn.primitive.name == "conv_general_dilated")
        + sum(map(_count_convolutions, _inner_jaxprs(eqn)))
        for eqn in jaxpr.eqns
    )


def _rules_used(loss, params, batch):
    from jaxgen._ghost import _discover, _trace

    leaves = jax.tree_util.tree_leaves(params)
    one = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in jax.tree_util.tree_leaves(batch)]
    plan = _discover(_trace(loss, params, batch), leaves, one)
    names = {id(rule): name for name, rule in rules.RULES.items()}
    return {names[id(plan.uses[u].rule)] for u in plan.fast.values()}


def test_auto_takes_the_vmap_path_when_the_exact_path_would_loop_per_example(monkeypatch):
    """A scan whose body transforms the weight it closes over stays closed, and its
    exact path would differentiate the whole loop per example."""
    from jaxgen import _per_example

    calls = []
    original = _per_example._dispersion_vmap.__wrapped__

    def spy(*args):
        calls.append(True)
        return original(*args)

    params = {"cell": _normal(40, D, D) / 2, "out": _normal(41, D, H)}

    def loss(p, z):  # the weight is transformed inside the body: no rule, the scan closes
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ jnp.sin(p["cell"])), None), z["x"], length=3)
        return _xent(h @ p["out"], z["y"])

    monkeypatch.setattr(_per_example, "_dispersion_vmap", spy)
    _check(loss, params, BATCH, warns=True)  # "ghost" still follows the program, warning
    assert calls  # "auto" took the vmap path


def _stacked_block(h, layer):
    """A residual pre-norm block with a gain, a bias and two dense layers."""
    normed = h * jax.lax.rsqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6) * layer["scale"]
    return h + jnp.tanh(normed @ layer["up"] + layer["b"]) @ layer["down"]


def _stack(key, layers):
    return {
        "scale": 1 + _normal(key, layers, D) / 4,
        "up": _normal(key + 1, layers, D, 2 * D) / 3,
        "b": _normal(key + 2, layers, 2 * D) / 4,
        "down": _normal(key + 3, layers, 2 * D, D) / 3,
    }


SEQUENCE = {"x": _normal(50, B, 3, D), "y": BATCH["y"]}  # 3 tokens per example


def _scanned(body, **scan_kwargs):
    def loss(p, z):
        h, _ = jax.lax.scan(lambda h, layer: (body(h, layer), None), z["x"], p["stack"],
                            **scan_kwargs)  # fmt: skip
        return _xent(h.mean(0) @ p["out"], z["y"])

    return loss


OPENED_SCANS = {
    "stacked blocks": _scanned(_stacked_block),
    "reversed and unrolled": _scanned(_stacked_block, reverse=True, unroll=2),
    "a scan in a scan": _scanned(lambda h, group: jax.lax.scan(
        lambda h, layer: (_stacked_block(h, layer), None), h, group)[0]),
}  # fmt: skip


@pytest.mark.parametrize("name", OPENED_SCANS)
def test_scans_over_stacked_layers_get_ghost_norms_per_layer(name):
    stack = _stack(51, 4)
    if name == "a scan in a scan":  # 2 groups of 2 layers
        stack = jax.tree_util.tree_map(lambda a: a.reshape(2, 2, *a.shape[1:]), stack)
    params = {"stack": stack, "out": _normal(55, D, H)}
    loss = OPENED_SCANS[name]
    _check(loss, params, SEQUENCE, warns=False)
    assert _rules_used(loss, params, SEQUENCE) == {"dense", "bias", "gain"}


@pytest.mark.parametrize("name", ["stacked blocks", "a scan in a scan"])
def test_uses_in_scans_give_their_statistics_from_the_backward_pass(name):
    """A tapped use (in an opened scan) captures nothing, and the gradient of its probe
    is the ‖g_i‖² or g_i per example and iteration that its captured operand and δ give
    (the backward pass with ``tapped=False`` captures them)."""
    stack = _stack(51, 4)
    if name == "a scan in a scan":
        stack = jax.tree_util.tree_map(lambda a: a.reshape(2, 2, *a.shape[1:]), stack)
    params, loss = {"stack": stack, "out": _normal(55, D, H)}, OPENED_SCANS[name]
    leaves, examples = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(SEQUENCE)
    traced = ghost_module._trace(loss, params, SEQUENCE)
    one = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in examples]
    plan = ghost_module._discover(traced, leaves, one)
    tapped = ghost_module._backward(traced, plan, leaves, examples)
    captured = ghost_module._backward(traced, plan, leaves, examples, tapped=False)
    checked = 0
    for u in plan.fast.values():
        use = plan.uses[u]
        if not use.loops:
            assert tapped.stats[u] is None
            continue
        assert tapped.captured[u] == [] and tapped.deltas[u] == []
        (x,), (delta,) = captured.captured[u], captured.deltas[u]
        statistic = ghost_module._tap(use).statistic
        for _ in range(len(use.loops) + 1):  # loop axes, then the batch axis
            statistic = jax.vmap(statistic)
        want = statistic([x], delta)
        assert tapped.stats[u].shape == want.shape and want.shape[: len(use.loops) + 1] == (
            *use.loops,
            B,
        )
        np.testing.assert_allclose(tapped.stats[u], want, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == 4  # scale, up, b, down


def test_scanned_layers_in_float64_give_float64_results():
    """Tapped statistics take the parameters' precision too (x64)."""
    with jax.enable_x64(True):
        to64 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float64))
        params = to64({"stack": _stack(51, 4), "out": _normal(55, D, H)})
        batch = {"x": SEQUENCE["x"].astype(jnp.float64), "y": SEQUENCE["y"]}
        loss = OPENED_SCANS["stacked blocks"]
        stats = jaxgen.gradient_dispersion(loss, params, batch, method="ghost")
        assert stats.dispersion.dtype == stats.sq_norms.dtype == jnp.float64
        sq_norms, dispersion, _, grads = _oracle(loss, params, batch)
        np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=1e-10)
        np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-10)


def test_a_counter_carry_and_a_zero_state_that_becomes_example_data():
    """The carries start as constants; the state mixes with the example in the body."""
    params = {"w": _normal(56, 3, D, D) / 2, "out": _normal(57, D, H)}

    def loss(p, z):
        def step(carry, xs):
            count, state = carry
            w, x = xs
            return (count + 1.0, jnp.tanh(state + x @ w) * count), None

        (_, state), _ = jax.lax.scan(step, (1.0, jnp.zeros(D)), (p["w"], z["x"]))
        return _xent(state @ p["out"], z["y"])

    _check(loss, params, {"x": _normal(58, B, 3, D), "y": BATCH["y"]}, warns=False)


def test_a_stacked_leaf_also_used_outside_its_scan_keeps_the_exact_path():
    params = {"w": _normal(59, 3, D, D) / 2, "out": _normal(60, D, H)}

    def loss(p, z):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), z["x"], p["w"])
        return _xent(h @ p["out"] + jnp.sum(z["x"] @ p["w"][0]), z["y"])

    _check(loss, params, BATCH, warns=True)


def test_flax_nn_scan_stack():
    class Block(linen.Module):
        @linen.compact
        def __call__(self, h, _):
            return h + linen.Dense(D)(jnp.tanh(linen.LayerNorm()(h))), None

    class Stack(linen.Module):
        @linen.compact
        def __call__(self, x):
            scan = linen.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                              length=3)  # fmt: skip
            h, _ = scan()(x, None)
            return linen.Dense(H)(h.mean(0))

    model = Stack()
    variables = model.init(jax.random.key(61), SEQUENCE["x"][0])
    loss = lambda v, z: _xent(model.apply(v, z["x"]), z["y"])  # noqa: E731
    _check(loss, variables, SEQUENCE, warns=False)
    assert _rules_used(loss, variables, SEQUENCE) == {"dense", "bias", "gain"}


def test_scanned_layers_are_exact_when_the_mean_gradient_dominates():
    """Stacked g_i = x_i δ per layer with x_i = c + ε_i: ‖ḡ‖² / dispersion ~ 1e8."""
    c, spread = 1e3, 0.1
    params = {"w": jnp.ones((2, D, 1))}

    def loss(p, z):
        out, _ = jax.lax.scan(lambda s, w: (s + (z["x"] @ w)[0], None), 0.0, p["w"])
        return out

    batch = {"x": c + spread * _normal(62, B, D)}
    sq_norms, dispersion, _, grads = _oracle(loss, params, batch)
    stats = jaxgen.gradient_dispersion(loss, params, batch)
    np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-3)
    np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=1e-6)
    _check_clipped(loss, params, batch, grads, rtol=1e-6)  # no cancellation


def test_a_cancelling_tapped_leaf_beside_one_that_does_not_cancel():
    """Two stacked leaves in one scan share the exact branch: ``w`` (g_i = x_i δ with
    x_i = c + ε_i, ‖ḡ‖²/dispersion ~ 1e8) takes its exact statistics, ``v`` keeps its own."""
    c, spread = 1e3, 0.1
    params = {"w": jnp.ones((2, D, 1)), "v": _normal(63, 2, D, 3) / 2}

    def loss(p, z):
        def layer(s, wv):
            w, v = wv
            return s + (z["x"] @ w)[0] + jnp.sum(jnp.tanh(z["u"] @ v)), None

        out, _ = jax.lax.scan(layer, 0.0, (p["w"], p["v"]))
        return out

    batch = {"x": c + spread * _normal(64, B, D), "u": _normal(65, B, D)}
    sq_norms, dispersion, _, grads = _oracle(loss, params, batch)
    stats = jaxgen.gradient_dispersion(loss, params, batch)
    np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-3)
    np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=1e-6)
    _check_clipped(loss, params, batch, grads, rtol=1e-6)  # no cancellation
    for name in ("w", "v"):
        with jax.enable_x64(True):
            grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(
                jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params),
                jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), batch),
            )[name]
        flat = np.asarray(grads).reshape(B, -1)
        want = np.sum((flat - flat.mean(0)) ** 2) / B
        np.testing.assert_allclose(stats.layer_dispersion[name], want, rtol=1e-3)


def test_scan_operand_counts_on_this_jax():
    """``scan_counts`` reads the constants and carries of a scan equation as the installed
    jax records them (``num_consts``/``num_carry`` up to 0.10, ``ft_in`` from 0.11)."""
    from jaxgen._ghost.interpreter import scan_counts

    a, b = jnp.ones(3), jnp.ones(3)

    def loss(c, xs, ys):
        return jax.lax.scan(lambda c, xy: (c * a + xy[0] * b, c), c, (xs, ys))

    jaxpr = jax.make_jaxpr(loss)(jnp.ones(3), jnp.ones((4, 3)), jnp.ones((4, 3)))
    (scan,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert scan_counts(scan) == (2, 1)
    assert len(scan.invars) == 2 + 1 + 2


def _unguarded_conds(jaxpr):
    """``cond`` equations in ``jaxpr`` and its calls, not counting those inside a cond."""
    return sum(
        1 if eqn.primitive.name == "cond" else sum(map(_unguarded_conds, _inner_jaxprs(eqn)))
        for eqn in jaxpr.eqns
    )


def test_one_cond_guards_every_leaf_and_only_the_cancelling_one_is_recomputed():
    """Captured leaves (``w``, ``v``) and a tapped one (``s``, stacked in a scan) share one
    ``lax.cond`` on the path taken when nothing cancels (a GPU waits on the host for each
    predicate); inside it ``w`` (g_i = x_i δ with x_i = c + ε_i, ‖ḡ‖²/dispersion ~ 1e8)
    takes its exact statistics and the others keep their ghost ones."""
    c, spread = 1e3, 0.1
    params = {"w": jnp.ones((D, 1)), "v": _normal(66, D, 3) / 2, "s": _normal(67, 2, D, 3) / 2}

    def loss(p, z):
        stacked, _ = jax.lax.scan(
            lambda t, s: (t + jnp.sum(jnp.tanh(z["u"] @ s)), None), 0.0, p["s"]
        )
        return (z["x"] @ p["w"])[0] + jnp.sum(jnp.tanh(z["u"] @ p["v"])) + stacked

    batch = {"x": c + spread * _normal(68, B, D), "u": _normal(69, B, D)}
    assert _rules_used(loss, params, batch) == {"dense"}
    sq_norms, dispersion, _, grads = _oracle(loss, params, batch)
    for method in ("ghost", "auto"):
        stats = jaxgen.gradient_dispersion(loss, params, batch, method=method)
        np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-3)
        np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=1e-6)
    with jax.enable_x64(True):
        to64 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float64))
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(to64(params), to64(batch))
    for name, g in grads.items():
        flat = np.asarray(g).reshape(B, -1)
        want = np.sum((flat - flat.mean(0)) ** 2) / B
        np.testing.assert_allclose(stats.layer_dispersion[name], want, rtol=1e-3)
    ghost = jax.make_jaxpr(lambda p, b: jaxgen.gradient_dispersion(loss, p, b, method="ghost"))
    assert _unguarded_conds(ghost(params, batch).jaxpr) == 1


def test_recurrent_cells_closed_over_by_a_scan_are_tied_ghost_leaves():
    """h_{t+1} = tanh(h_t W_h + x_t W_x + b) over a sequence: every step uses the same
    weights, so g_i = Σ_t (rows of step t)ᵀ δ_t, one product over all steps' rows."""
    params = {"wh": _normal(70, D, D) / 3, "wx": _normal(71, D, D) / 3, "b": _normal(72, D),
              "out": _normal(73, D, H)}  # fmt: skip

    def loss(p, z):
        def step(h, x):
            return jnp.tanh(h @ p["wh"] + x @ p["wx"] + p["b"]), None

        h, _ = jax.lax.scan(step, jnp.zeros(D), z["x"])
        return _xent(h @ p["out"], z["y"])

    _check(loss, params, SEQUENCE, warns=False)
    assert _rules_used(loss, params, SEQUENCE) == {"dense", "bias"}


def test_tied_blocks_with_token_rows_and_gains():
    """A pre-norm block applied three times (fori_loop) to 3 tokens: T = 3 rows per
    iteration, 9 in the product; the gain and the bias summed over iterations."""
    params = {"scale": 1 + _normal(74, D) / 4, "up": _normal(75, D, H) / 2, "b": _normal(76, H),
              "down": _normal(77, H, D) / 2, "out": _normal(78, D, H)}  # fmt: skip

    def loss(p, z):
        h = jax.lax.fori_loop(0, 3, lambda i, h: _stacked_block(h, p), z["x"])
        return _xent(h.mean(0) @ p["out"], z["y"])

    _check(loss, params, SEQUENCE, warns=False)
    assert _rules_used(loss, params, SEQUENCE) == {"dense", "bias", "gain"}


def test_a_slice_closed_over_by_an_inner_loop_stays_exact():
    """Stacked weights whose slice an inner fori_loop applies twice: neither a partition
    nor a sum over all iterations, so the scans stay closed and the leaf is exact."""
    params = {"stack": _normal(79, 2, D, D) / 3, "out": _normal(80, D, H)}

    def loss(p, z):
        def layer(h, w):
            return jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ w), h), None

        h, _ = jax.lax.scan(layer, z["x"], p["stack"])
        return _xent(h @ p["out"], z["y"])

    _check(loss, params, BATCH, warns=True)


def test_tied_layers_are_exact_when_the_mean_gradient_dominates():
    """A tied g_i = Σ_t x_i δ with x_i = c + ε_i: ‖ḡ‖² / dispersion ~ 1e8."""
    c, spread = 1e3, 0.1
    params = {"w": jnp.ones((D, 1))}

    def loss(p, z):
        out, _ = jax.lax.scan(lambda s, _: (s + (z["x"] @ p["w"])[0], None), 0.0, length=3)
        return out

    batch = {"x": c + spread * _normal(81, B, D)}
    assert _rules_used(loss, params, batch) == {"dense"}  # the ghost path, with its exact branch
    sq_norms, dispersion, _, grads = _oracle(loss, params, batch)
    stats = jaxgen.gradient_dispersion(loss, params, batch)
    np.testing.assert_allclose(stats.dispersion, dispersion, rtol=1e-3)
    np.testing.assert_allclose(stats.sq_norms, sq_norms, rtol=1e-6)
    _check_clipped(loss, params, batch, grads, rtol=1e-6)  # no cancellation


def test_a_convolution_repeated_by_a_loop_sums_its_kernel_gradients():
    params = {"kernel": _normal(82, 3, 3, 2, 2) / 3, "out": _normal(83, 2, H)}
    batch = {"x": _normal(84, B, 1, 6, 6, 2), "y": BATCH["y"]}

    def loss(p, z):
        conv = functools.partial(
            jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(conv(h, p["kernel"])), z["x"])
        return _xent(h.mean((0, 1, 2)) @ p["out"], z["y"])

    _check(loss, params, batch, warns=False, rtol=5e-4)
    assert _rules_used(loss, params, batch) == {"conv", "dense"}
