"""RunResult: result.json's keys as fields, and the files read back."""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np

import jaxgen
from jaxgen.experiments import results
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.results import EpochMetrics, RunResult, StepLogs


def _result(**changes):
    fields = {
        f.name: 1.0 for f in dataclasses.fields(RunResult) if f.default is dataclasses.MISSING
    }
    rows = (EpochMetrics(1, 2.0, 2.5, 0.3, 0.2, 0.3, math.nan, 7.0),)
    values = fields | {"config": TrainConfig().as_dict(), "optimizer": "SGD", "epochs": rows}
    values |= {"seconds": 12.5, "seconds_per_epoch": 1.5, "tracking": "V_t measured"}
    return RunResult(**values | changes)


def test_result_json_has_the_fields_and_omits_theorems_of_other_models():
    result = _result(theorem2_bound=0.5)
    values = result.to_json()
    assert values["theorem2_bound"] == 0.5
    assert "theorem3_bound" not in values and "final_active_fraction" not in values
    assert "epochs" not in values and "seconds" in values
    assert "eq2_bound" not in _result(eq2_bound=None).to_json()  # bounds not estimated


def test_written_files_read_back_as_the_same_result(tmp_path):
    result = _result(theorem3_bound=0.25, final_active_fraction=0.5)
    logs = StepLogs(losses=[1.0, 0.5], variances=[0.1, math.nan], epochs=list(result.epochs))
    results.write(tmp_path, result, np.array([0.1, 0.1]), logs, title="t")
    again = RunResult.read(tmp_path)
    assert again == result
    np.testing.assert_array_equal(np.array(again.epochs), np.array(result.epochs))
    assert json.loads((tmp_path / "result.json").read_text()) == result.to_json()
    assert np.load(tmp_path / "steps.npz")["variances"][1] != 0  # NaN kept, not filled


def test_step_logs_survive_json():
    logs = StepLogs([1.0], [0.5], [0.0], [3.0], [EpochMetrics(1, 1, 1, 1, 1, 1, 1, 1)])
    assert StepLogs.from_json(json.loads(json.dumps(logs.to_json()))) == logs


def test_filled_variances_hold_the_last_measurement():
    filled = results.filled_variances([1.0, math.nan, math.nan, 4.0, math.nan])
    np.testing.assert_array_equal(filled, [1.0, 1.0, 1.0, 4.0, 4.0])


def test_a_non_positive_trace_gives_nan_second_order_bounds_not_a_crash():
    config = TrainConfig(epochs=1, lr=0.1)
    logs = StepLogs([1.0, 0.9], [0.5, 0.4], [0.0, 0.0], [2.0, 2.0], [_result().epochs[0]])
    trace = jaxgen.TraceEstimate(jnp.float32(-3.0), jnp.float32(1.0), 4)
    flatness = jaxgen.MonteCarloEstimate(jnp.float32(0.0), jnp.float32(0.0), 4)
    estimates = results.FinalEstimates(trace, 6, flatness, results.optimal_sigma(
        config, [0.1, 0.1], logs, trace, 60), None)  # fmt: skip
    result = results.summarize(
        config, [0.1, 0.1], logs, estimates, n=60, version="test", tracking="V_t measured"
    )
    for value in (result.optimal_sigma, result.eq2_bound, result.theorem1_bound):
        assert math.isnan(value)
    assert result.hessian_trace == -3.0 and result.sum_lr2_variance > 0
