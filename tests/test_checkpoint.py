"""Resuming: the stored configuration first, damaged checkpoints set aside, nothing deleted."""

import dataclasses
import warnings

import numpy as np
import pytest

from jaxgen.experiments import loop
from jaxgen.experiments.checkpoint import config_changes
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.errors import ConfigError, RunWarning

TINY = TrainConfig(
    width=8, epochs=2, batch_size=20, lr=0.1, num_train=60, hessian_probes=2,
    flatness_samples=2, checkpoint_every=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("finished")
    return loop.run(TINY, out), out


def _truncate_arrays(checkpoint):
    for path in (checkpoint / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 16 and "metadata" not in path.name.lower():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_changed_setting_is_named_before_anything_is_restored(finished):
    _, out = finished
    with pytest.raises(ConfigError, match=r"other settings \(width: 8 → 16\)"):
        loop.run(dataclasses.replace(TINY, width=16), out, resume=True)
    with pytest.raises(ConfigError, match=r"lr: 0.1 → 0.2; method"):
        loop.run(dataclasses.replace(TINY, lr=0.2, method=loop.methods.GMP()), out, resume=True)
    assert config_changes({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 → 3", "c: None → 4"]


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    finished, tmp_path
):
    reference, out = finished
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "result.json").unlink()
    _truncate_arrays(copy / "checkpoints" / "6")
    with pytest.warns(
        RunWarning, match=r"checkpoint step 6 .* is damaged .* moved it aside to 6\.damaged"
    ):
        resumed = loop.run(TINY, copy, resume=True)
    assert resumed == dataclasses.replace(reference, seconds=resumed.seconds)
    assert (copy / "checkpoints" / "6.damaged").is_dir()  # kept, not deleted


def test_no_intact_checkpoint_says_how_to_start_over(finished, tmp_path):
    import shutil

    _, out = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "checkpoints" / "6" / "logs" / "metadata").write_text('{"losses": [1.0, ')
    _truncate_arrays(copy / "checkpoints" / "3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            ConfigError, match="no intact checkpoint in .*start over with another --out"
        ):
            loop.run(TINY, copy, resume=True)
    assert sum(issubclass(w.category, RunWarning) for w in caught) == 2
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["3.damaged", "6.damaged"]
    np.testing.assert_equal((copy / "result.json").exists(), True)  # nothing else touched
