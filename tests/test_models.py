import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.experiments import models, task


def _count(model):
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "name, shape, small, large",
    [
        ("two-layer-relu", (40,), 8, 16),
        ("mlp", (40,), 8, 16),
        ("mlp", (28, 28, 1), 8, 16),
        ("alexnet", (32, 32, 3), 4, 8),
        ("vgg16", (32, 32, 3), 4, 8),
        ("preactresnet18", (32, 32, 3), 4, 8),
    ],
)
def test_shapes_and_width(name, shape, small, large):
    model = models.build(name, shape, 10, small)
    model.eval()
    batch = jnp.ones((2, *shape))
    outputs = model(batch)
    single = model(batch[0])
    expected = (2,) if models.SPECS[name].regression else (2, 10)
    assert outputs.shape == expected and single.shape == expected[1:]
    np.testing.assert_allclose(single, outputs[0], rtol=1e-4, atol=1e-5)
    assert _count(models.build(name, shape, 10, large)) > _count(model)


def test_parameter_counts_are_the_architectures():
    assert _count(models.build("mlp", (40,), 10, 16)) == 40 * 16 + 16 + 16 * 10 + 10
    assert _count(models.build("linear", (40,), 10, 99)) == 40
    relu = models.build("two-layer-relu", (40,), 10, 16)
    assert _count(relu) == 16 * 40  # the ±1 output signs are not trained
    assert set(np.unique(np.asarray(relu.signs[...]))) <= {-1.0, 1.0}


def test_alexnet_matches_the_classic_cifar_sizes():
    model = models.build("alexnet", (32, 32, 3), 10, 64)
    assert model.fc1.in_features == 8 * 8 * 64 and model.fc1.out_features == 384
    assert model.fc2.out_features == 192


def test_squared_loss_targets_and_correctness():
    model = models.build("linear", (3,), 10, 1)
    pure = task.trainable("linear", model)
    params = jax.tree_util.tree_map(lambda _: jnp.array([1.0, 0.0, 0.0]), pure.params)
    example = {"x": jnp.array([0.5, 0.0, 0.0]), "y": jnp.int32(3)}  # odd -> target −1
    np.testing.assert_allclose(pure.loss_fn(params, example), 0.5 * (-1 - 0.5) ** 2)
    outputs = pure.predict(params, pure.model_state, jnp.array([[0.5, 0, 0], [-0.5, 0, 0]]))
    assert task.correct(outputs, jnp.array([2, 3])).tolist() == [True, True]
    logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert task.correct(logits, jnp.array([1, 2])).tolist() == [True, False]


def test_only_convolutional_models_are_stepped_one_update_at_a_time():
    looped = [name for name, spec in models.SPECS.items() if spec.convolutional]
    assert looped == ["alexnet", "vgg16", "preactresnet18"]


def test_image_models_need_images():
    with pytest.raises(ValueError, match="needs image inputs"):
        models.build("alexnet", (40,), 10, 8)
    with pytest.raises(ValueError, match="model must be one of"):
        models.build("resnet1000", (32, 32, 3), 10, 8)
