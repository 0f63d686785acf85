import collections
import json
import os
import stat

import numpy as np
import pytest

from jaxgen.experiments import report
from jaxgen.experiments.results import EpochMetrics

Run = collections.namedtuple("Run", "eq2_bound gap")


def test_json_is_written_atomically_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = report.write_json_atomic(
        tmp_path / "sub" / "result.json", {"gap": 0.5, "x": float("nan")}
    )
    assert json.loads(path.read_text())["gap"] == 0.5
    with pytest.raises(TypeError):
        report.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["gap"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left


def test_npz_and_figures(tmp_path):
    report.write_npz_atomic(tmp_path / "steps.npz", lrs=np.ones(3))
    np.testing.assert_array_equal(np.load(tmp_path / "steps.npz")["lrs"], np.ones(3))
    rows = [
        EpochMetrics(e, 1.0, 2.0, 0.1 * e, 0.05 * e, 0.1 * e, 0.02 * e, 10.0 / e)
        for e in range(1, 6)
    ]
    assert report.dispersion_figure(rows, tmp_path / "f2.png").stat().st_size > 1000
    runs = [Run(eq2_bound=1.0, gap=0.1), Run(eq2_bound=2.0, gap=-0.1)]  # a negative gap
    assert report.sweep_figure(
        [8, 16], runs, tmp_path / "f1.png", xlabel="width", log_x=True
    ).exists()


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o027)
    try:
        path = report.write_text_atomic(tmp_path / "metrics.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
