import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen


def test_algorithm_1_on_a_hand_computed_sequence():
    """G = 10, α = 0.5, T_c = 2; each row: gradient in, expected gradient out, G after."""
    clip = jaxgen.dynamic_clip(initial_norm=10.0, alpha=0.5, start_step=2)
    steps = [
        ([12.0, 16.0], [12.0, 16.0], 10.0),  # t=1 <= T_c: unchanged, ‖g‖ = 20 ignored
        ([0.3, 0.4], [0.3, 0.4], 10.0),  # t=2 <= T_c: unchanged, G not updated
        ([0.0, 4.0], [0.0, 4.0], 4.0),  # t=3: 4 <= 10, G ← 4
        ([6.0, 8.0], [1.2, 1.6], 4.0),  # t=4: 10 > 4, g ← 0.5·4·g/10
        ([3.0, 0.0], [3.0, 0.0], 3.0),  # t=5: 3 <= 4, G ← 3
        ([np.nan, 1.0], [np.nan, 1.0], 3.0),  # t=6: non-finite passes, never becomes G
        ([np.inf, 0.0], [np.inf, 0.0], 3.0),  # t=7: likewise
        ([0.0, 3.0], [0.0, 3.0], 3.0),  # t=8: ‖g‖ = G is not > G: G ← 3
        ([0.0, -30.0], [0.0, -1.5], 3.0),  # t=9: clipped to α·G = 1.5
    ]
    state = clip.init(jnp.zeros(2))
    for t, (grad, expected, threshold) in enumerate(steps, start=1):
        out, state = clip.update(jnp.asarray(grad), state)
        np.testing.assert_allclose(out, expected, rtol=1e-6, err_msg=f"step {t}")
        assert float(state.threshold) == pytest.approx(threshold), f"step {t}"
        assert int(state.count) == t
    assert int(state.num_clipped) == 2


def test_a_clip_never_enlarges_the_step():
    """The authors' code rescaled the first clipped gradient to a fixed 50 (defect 8)."""
    clip = jaxgen.dynamic_clip(initial_norm=50.0, alpha=0.1, start_step=0)
    out, state = clip.update(jnp.array([60.0, 0.0]), clip.init(jnp.zeros(2)))
    assert float(jnp.linalg.norm(out)) == pytest.approx(5.0)
    assert int(state.num_clipped) == 1


def test_the_norm_is_global_over_the_pytree():
    clip = jaxgen.dynamic_clip(initial_norm=1.0, alpha=1.0, start_step=0)
    grads = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}
    out, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(out["a"], [0.6])
    np.testing.assert_allclose(out["b"], [[0.8]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_norm": 0.0}, "initial_norm must be a finite number > 0, got 0.0"),
        ({"initial_norm": float("inf")}, "initial_norm must be a finite number > 0"),
        ({"alpha": -1.0}, r"alpha must lie in \(0, 1\], got -1.0"),
        ({"start_step": -1}, "start_step must be an integer >= 0, got -1"),
        ({"start_step": 1.5}, "start_step must be an integer >= 0, got 1.5"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    arguments = {"initial_norm": 50.0, "alpha": 0.1, "start_step": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxgen.dynamic_clip(**arguments)
