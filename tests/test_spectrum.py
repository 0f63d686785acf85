"""Lanczos eigenvalues, stochastic Lanczos quadrature and the Hessian's diagonal against
the exact Hessian of small models in float64 (``jax.hessian``, ``jnp.linalg.eigh``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cnn_init, cnn_loss, mlp_init, mlp_loss
from jax.flatten_util import ravel_pytree

import jaxgen


def _f64(tree):
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _batch(size=8, features=6, key=0):
    kx, ky = jax.random.split(jax.random.key(key))
    return {
        "x": jax.random.normal(kx, (size, features)),
        "y": jax.random.randint(ky, (size,), 0, 3),
    }


def exact_hessian(loss_fn, params, batch):
    """The Hessian of the mean loss on the flattened parameters, and its unravel."""
    flat, unravel = ravel_pytree(params)

    def mean(v):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(unravel(v), batch))

    return np.asarray(jax.hessian(mean)(flat)), unravel


@pytest.fixture(scope="module")
def mlp64():
    with jax.enable_x64(True):
        params, batch = _f64(mlp_init(jax.random.key(2))), _f64(_batch())
        hessian, _ = exact_hessian(mlp_loss, params, batch)
    return params, batch, hessian


def test_top_and_smallest_eigenvalues_with_full_iterations_are_exact(mlp64):
    params, batch, hessian = mlp64
    exact = np.linalg.eigvalsh(hessian)
    size = hessian.shape[0]
    with jax.enable_x64(True):
        top = jaxgen.hessian_eigenvalues(
            mlp_loss, params, batch, key=0, k=3, num_iterations=size, vectors=True
        )
        low = jaxgen.hessian_eigenvalues(
            mlp_loss, params, batch, key=1, k=2, num_iterations=size, which="smallest"
        )
        flat_vectors = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(top.vectors))
    scale = np.abs(exact).max()
    np.testing.assert_allclose(top.values, exact[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(low.values, exact[:2], rtol=1e-6, atol=1e-9 * scale)
    assert exact[0] < 0  # a cross-entropy MLP at random weights has negative curvature
    assert np.all(np.asarray(top.residuals) < 1e-6 * scale)
    assert top.num_hvps == size
    np.testing.assert_allclose(
        flat_vectors @ hessian, np.asarray(top.values)[:, None] * flat_vectors, atol=1e-6 * scale
    )


def test_a_few_iterations_give_the_top_eigenvalue_within_its_residual(mlp64):
    params, batch, hessian = mlp64
    exact = np.linalg.eigvalsh(hessian)
    with jax.enable_x64(True):
        top = jaxgen.hessian_eigenvalues(
            mlp_loss, params, batch, key=0, k=2, num_iterations=12, vectors=True
        )
        flat_vectors = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(top.vectors))
    # the residuals read off the iteration are the true ‖Hv − λv‖ of the returned vectors
    true = np.linalg.norm(
        flat_vectors @ hessian - np.asarray(top.values)[:, None] * flat_vectors, axis=1
    )
    np.testing.assert_allclose(top.residuals, true, rtol=1e-6, atol=1e-12)
    assert true[1] > 1e-6  # not converged: the comparison means something
    # symmetric H: some eigenvalue lies within ‖Hv − λv‖ of the Ritz value λ
    assert np.min(np.abs(exact - float(top.values[0]))) <= float(top.residuals[0]) + 1e-12
    assert abs(float(top.values[0]) - exact[-1]) < 1e-3 * exact[-1]


def test_an_invariant_krylov_space_restarts_and_finds_every_eigenvalue():
    """H = diag(1, 1, 1, 2, 2): every start's Krylov space has dimension 2, so Lanczos
    breaks down twice in five steps; the restarts must stay orthogonal to the basis (±1
    restart vectors did not: they can be orthogonal to what is left)."""
    loss = lambda w, z: 0.5 * jnp.sum(z * w**2)  # noqa: E731
    batch = jnp.array([[1.0, 1.0, 1.0, 2.0, 2.0]])
    with jax.enable_x64(True):
        for key in range(4):
            got = jaxgen.hessian_eigenvalues(
                loss, jnp.ones(5), batch, key=key, k=5, num_iterations=5, vectors=True
            )
            vectors = np.asarray(got.vectors)
            np.testing.assert_allclose(got.values, [2, 2, 1, 1, 1], atol=1e-12)
            np.testing.assert_allclose(vectors @ vectors.T, np.eye(5), atol=1e-12)
            np.testing.assert_allclose(got.residuals, 0, atol=1e-12)
    # two parameters, two steps: the step beyond leaves exactly nothing (no 0/0 anywhere)
    got = jaxgen.hessian_eigenvalues(
        loss, jnp.ones(2), jnp.array([[3.0, 1.0]]), key=0, k=2, num_iterations=2, vectors=True
    )
    np.testing.assert_allclose(got.values, [3, 1], rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.asarray(got.vectors)), np.eye(2), atol=1e-6)


def test_without_reorthogonalisation_the_top_value_and_its_residual_hold(mlp64):
    params, batch, hessian = mlp64
    exact = np.linalg.eigvalsh(hessian)
    with jax.enable_x64(True):
        full, plain = (
            jaxgen.hessian_eigenvalues(
                mlp_loss, params, batch, key=0, num_iterations=25, vectors=True,
                reorthogonalize=reorthogonalize,
            )
            for reorthogonalize in (True, False)
        )  # fmt: skip
        vector = np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda v: v[0], plain.vectors))[0])
    top = float(plain.values[0])
    np.testing.assert_allclose(top, exact[-1], rtol=1e-9)
    np.testing.assert_allclose(top, float(full.values[0]), rtol=1e-9)
    true = np.linalg.norm(hessian @ vector - top * vector) / np.linalg.norm(vector)
    assert true < 1e-6 * exact[-1] and float(plain.residuals[0]) < 1e-6 * exact[-1]


def test_slq_moments_and_density_agree_with_the_exact_spectrum(mlp64):
    params, batch, hessian = mlp64
    exact = np.linalg.eigvalsh(hessian)
    size = hessian.shape[0]
    with jax.enable_x64(True):
        spectrum = jaxgen.hessian_spectrum(
            mlp_loss, params, batch, key=3, num_probes=24, num_iterations=size
        )
        np.testing.assert_allclose(np.sum(spectrum.weights, axis=1), 1.0, rtol=1e-10)
        for order, want in ((1, np.trace(hessian) / size), (2, np.sum(exact**2) / size)):
            value, stderr = spectrum.moment(order)
            assert abs(float(value) - want) < 4 * float(stderr), (order, value, want, stderr)
        spread = exact.max() - exact.min()
        grid = jnp.linspace(exact.min() - 0.1 * spread, exact.max() + 0.1 * spread, 600)
        sigma = 0.02 * spread
        estimated = jaxgen.spectral_density(spectrum, grid, sigma=sigma)
        reference = jaxgen.spectral_density(
            jaxgen.Spectrum(jnp.asarray(exact)[None], jnp.full((1, size), 1.0 / size)),
            grid,
            sigma=sigma,
        )
        estimated, reference = np.asarray(estimated), np.asarray(reference)
        step = float(grid[1] - grid[0])
    assert abs(np.sum(reference) * step - 1) < 1e-3
    assert np.sum(np.abs(estimated - reference)) * step < 0.2  # L1 distance


def test_the_diagonal_and_block_traces_agree_with_the_exact_hessian(mlp64):
    params, batch, hessian = mlp64
    with jax.enable_x64(True):
        got = jaxgen.hessian_diagonal(mlp_loss, params, batch, key=4, num_probes=400)
        _, unravel = ravel_pytree(params)
        diagonal = np.diag(hessian)
        flat = np.asarray(ravel_pytree(got.diagonal)[0])
        stderr = np.asarray(ravel_pytree(got.diagonal_stderr)[0])
        blocks = jax.tree_util.tree_map(lambda d: float(jnp.sum(d)), unravel(jnp.asarray(diagonal)))
    z = np.abs(np.asarray(flat) - diagonal) / np.maximum(np.asarray(stderr), 1e-12)
    assert np.mean(z < 3) > 0.95 and z.max() < 6, z
    for got_block, err, want in zip(
        *map(jax.tree_util.tree_leaves, (got.block_traces, got.block_trace_stderr, blocks)),
        strict=True,
    ):
        assert abs(float(got_block) - want) < 4 * float(err) + 1e-12, (got_block, want, err)


def _stacked():
    """A scanned stack of two tanh layers and a ``jax.checkpoint`` block (float32)."""
    keys = jax.random.split(jax.random.key(5), 3)
    params = {
        "w": jax.random.normal(keys[0], (2, 6, 6)) / 3,
        "out": jax.random.normal(keys[1], (6, 3)),
    }

    def loss_fn(params, z):
        def layer(h, w):
            return jax.checkpoint(lambda h: jnp.tanh(h @ w))(h), None

        h, _ = jax.lax.scan(layer, z["x"], params["w"])
        return -jax.nn.log_softmax(h @ params["out"])[z["y"]]

    return loss_fn, params, _batch()


@pytest.mark.parametrize("program", ["scanned checkpointed stack", "cnn"])
def test_every_estimator_follows_scans_checkpoints_and_convolutions(program):
    if program == "cnn":
        loss_fn, params = cnn_loss, cnn_init(jax.random.key(6))
        kx, ky = jax.random.split(jax.random.key(7))
        batch = {"x": jax.random.normal(kx, (6, 8)), "y": jax.random.randint(ky, (6,), 0, 3)}
    else:
        loss_fn, params, batch = _stacked()
    hessian, _ = exact_hessian(loss_fn, params, batch)
    exact = np.linalg.eigvalsh(hessian)
    size = hessian.shape[0]
    # 20 steps: the two largest have converged (fewer unrolled steps to compile for the CNN)
    top = jaxgen.hessian_eigenvalues(loss_fn, params, batch, key=0, k=2, num_iterations=20)
    np.testing.assert_allclose(top.values, exact[::-1][:2], rtol=2e-4)
    assert np.all(np.asarray(top.residuals) < 1e-3 * exact.max())
    spectrum = jaxgen.hessian_spectrum(
        loss_fn, params, batch, key=1, num_probes=6, num_iterations=8
    )
    value, stderr = spectrum.moment(1)
    assert abs(float(value) - np.trace(hessian) / size) < 5 * float(stderr) + 1e-5
    diagonal = jaxgen.hessian_diagonal(
        loss_fn, params, batch, key=2, num_probes=200, chunk_size=100
    )
    total = sum(float(t) for t in jax.tree_util.tree_leaves(diagonal.block_traces))
    error = np.sqrt(
        sum(float(e) ** 2 for e in jax.tree_util.tree_leaves(diagonal.block_trace_stderr))
    )
    assert abs(total - np.trace(hessian)) < 5 * error + 1e-4


def test_under_jit_and_on_a_data_mesh_the_numbers_of_one_device():
    params, batch = mlp_init(jax.random.key(2)), _batch(16)
    top = functools.partial(jaxgen.hessian_eigenvalues, mlp_loss, key=0, k=2, num_iterations=20)
    reference = top(params, batch)
    jitted = jax.jit(lambda p, b: top(p, b).values)(params, batch)
    np.testing.assert_allclose(jitted, reference.values, rtol=1e-5)
    mesh = jaxgen.make_mesh("data=2")
    sharded = top(jaxgen.replicate(params, mesh), jaxgen.shard_batch(batch, mesh))
    np.testing.assert_allclose(sharded.values, reference.values, rtol=1e-4)
    diagonal = functools.partial(jaxgen.hessian_diagonal, mlp_loss, key=1, num_probes=8)
    one, many = (
        diagonal(params, batch),
        diagonal(jaxgen.replicate(params, mesh), jaxgen.shard_batch(batch, mesh)),
    )
    for a, b in zip(*map(jax.tree_util.tree_leaves, (one.diagonal, many.diagonal)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_input_names_the_argument():
    params, batch = mlp_init(jax.random.key(2)), _batch()
    size = sum(x.size for x in jax.tree_util.tree_leaves(params))
    with pytest.raises(ValueError, match=f"k must be at most the number of parameters, {size}"):
        jaxgen.hessian_eigenvalues(mlp_loss, params, batch, key=0, k=size + 1)
    with pytest.raises(ValueError, match="which must be one of"):
        jaxgen.hessian_eigenvalues(mlp_loss, params, batch, key=0, which="top")
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1, got 0"):
        jaxgen.hessian_spectrum(mlp_loss, params, batch, key=0, num_probes=0)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1, got 0"):
        jaxgen.hessian_diagonal(mlp_loss, params, batch, key=0, num_probes=0)
    with pytest.raises(ValueError, match="loss_fn must return one float scalar per example"):
        jaxgen.hessian_eigenvalues(lambda p, z: z["x"] * 1.0, params, batch, key=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        jaxgen.spectral_density(
            jaxgen.Spectrum(jnp.zeros((1, 2)), jnp.ones((1, 2))), jnp.zeros(3), sigma=0
        )
