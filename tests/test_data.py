import numpy as np
import pytest

from jaxgen.experiments import data


@pytest.fixture(scope="module")
def small():
    return data.mnist1d(num_samples=500)


def test_mnist1d_is_generated_offline_and_deterministic(small, monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE_DIR", "")  # no file kept: generated anew
    again = data.mnist1d.__wrapped__(num_samples=500)
    assert small.x_train.shape == (400, 40) and small.x_test.shape == (100, 40)
    assert small.x_train.dtype == np.float32 and small.y_train.dtype == np.int32
    np.testing.assert_array_equal(small.x_train, again.x_train)
    assert not small.noisy_mask.any()
    np.testing.assert_array_equal(small.y_train, small.y_train_clean)


def test_mnist1d_is_generated_once_per_process_and_read_only(small):
    assert data.mnist1d(num_samples=500) is small
    with pytest.raises(ValueError, match="read-only"):
        small.y_train[0] = 1
    other = data.mnist1d(num_samples=500, seed=7)
    assert not np.array_equal(other.x_train, small.x_train)


def test_mnist1d_is_kept_on_disk_and_made_again_when_its_file_is_damaged(
    small, tmp_path, monkeypatch
):
    monkeypatch.setenv("JAXGEN_CACHE_DIR", str(tmp_path))
    made = data.mnist1d.__wrapped__(num_samples=500)
    [kept] = tmp_path.glob("mnist1d-*-seed42-n500-split0.8.npz")
    np.testing.assert_array_equal(made.x_train, small.x_train)
    kept.write_bytes(b"damaged")
    again = data.mnist1d.__wrapped__(num_samples=500)
    np.testing.assert_array_equal(again.x_test, small.x_test)
    import mnist1d.data

    def never(*args):
        raise AssertionError("generated although a good file is kept")

    monkeypatch.setattr(mnist1d.data, "make_dataset", never)
    read = data.mnist1d.__wrapped__(num_samples=500)  # from the file written again
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(read, name), getattr(small, name))


@pytest.mark.parametrize("always_wrong", [False, True])
def test_label_noise_rate_determinism_and_clean_test_labels(small, always_wrong):
    big = small._replace(
        y_train=np.tile(small.y_train, 50),
        y_train_clean=np.tile(small.y_train_clean, 50),
        noisy_mask=np.tile(small.noisy_mask, 50),
        x_train=np.tile(small.x_train, (50, 1)),
    )
    noisy = data.with_label_noise(big, 0.4, seed=3, always_wrong=always_wrong)
    again = data.with_label_noise(big, 0.4, seed=3, always_wrong=always_wrong)
    np.testing.assert_array_equal(noisy.y_train, again.y_train)
    np.testing.assert_array_equal(noisy.y_train_clean, big.y_train)
    np.testing.assert_array_equal(noisy.y_test, small.y_test)
    np.testing.assert_array_equal(noisy.noisy_mask, noisy.y_train != big.y_train)
    expected = 0.4 if always_wrong else 0.4 * (1 - 1 / 10)
    rate, n = noisy.noisy_mask.mean(), big.y_train.size
    assert abs(rate - expected) < 5 * np.sqrt(expected * (1 - expected) / n)
    other = data.with_label_noise(big, 0.4, seed=4, always_wrong=always_wrong)
    assert (other.y_train != noisy.y_train).any()


def test_label_noise_rejects_bad_rates(small):
    with pytest.raises(ValueError, match=r"label noise rate must lie in \[0, 1\], got 1.5"):
        data.with_label_noise(small, 1.5, seed=0)


def test_binary_unit_norm(small):
    task = data.binary_unit_norm(small)
    np.testing.assert_allclose(np.linalg.norm(task.x_train, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(task.y_train, small.y_train)


tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize(
    "name, shape, classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)]
)
def test_tfds_datasets_under_mock_data(tmp_path, name, shape, classes):
    with tfds.testing.mock_data(num_examples=6):
        dataset = data.tfds_dataset(name, data_dir=str(tmp_path))
    assert dataset.x_train.shape == (6, *shape) and dataset.x_test.shape == (6, *shape)
    assert dataset.x_train.dtype == np.float32
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() <= 1.0
    assert dataset.num_classes == classes and dataset.y_train.dtype == np.int32


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(
        data.DatasetUnavailable, match=r"cifar10 is not prepared in .*tfds build cifar10"
    ):
        data.tfds_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(data.DatasetUnavailable, match="dataset must be one of"):
        data.tfds_dataset("imagenet2012", data_dir=str(tmp_path))
