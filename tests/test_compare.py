"""compare: the table, the paper's numbers beside it, honest verdicts, and resuming."""

import csv
import json
import math

import pytest

from jaxgen import cli
from jaxgen.experiments import compare, paper
from jaxgen.experiments.compare import Row
from jaxgen.experiments.config import TrainConfig

TINY = ["--epochs", "2", "--width", "8", "--num-train", "60", "--batch-size", "20", "--lr",
        "0.1", "--label-noise", "0.2", "--no-progress", "--mesh", "data=1"]  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", "--methods", "erm,gmp:samples=2", "--seeds", "2", *TINY, "--out", str(out)]
    assert cli.main(argv) == 0
    return out, argv


def test_the_table_has_a_row_per_method_with_mean_and_std_over_seeds(compared):
    out, _ = compared
    with open(out / "compare.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["method"] for r in rows] == ["erm", "gmp:samples=2"]
    assert list(rows[0]) == list(Row._fields)
    for r in rows:
        runs = [json.loads((out / r["method"].replace(":", "_") / f"seed={s}" / "result.json")
                           .read_text()) for s in (0, 1)]  # fmt: skip
        best = [100 * run["best_test_accuracy"] for run in runs]
        assert float(r["best_mean"]) == pytest.approx(sum(best) / 2)
        assert float(r["best_std"]) == pytest.approx(abs(best[0] - best[1]) / math.sqrt(2))
        assert r["seeds"] == "2" and math.isnan(float(r["paper_mean"]))  # MNIST-1D: not in it
        assert runs[1]["config"]["seed"] == 1 and runs[0]["config"]["label_noise"] == 0.2
    text = (out / "compare.md").read_text()
    assert "| method | label noise | seeds | best test acc. | final test acc." in text
    assert "- gmp:samples=2 (noise 0.2): " in text and (out / "compare.png").stat().st_size > 1000


def test_an_interrupted_comparison_resumes_and_reuses_finished_runs(compared):
    out, argv = compared
    finished = out / "erm" / "seed=0" / "result.json"
    stamp = finished.stat().st_mtime_ns
    unfinished = out / "gmp_samples=2" / "seed=1"
    before = json.loads((unfinished / "result.json").read_text())
    (unfinished / "result.json").unlink()  # as if stopped after its last checkpoint
    table = (out / "compare.csv").read_text()
    assert cli.main(argv) == 0
    assert finished.stat().st_mtime_ns == stamp  # reused, not rerun
    again = json.loads((unfinished / "result.json").read_text())
    assert again["test_accuracy"] == before["test_accuracy"]
    assert _numbers(out / "compare.csv") == _numbers_of(table)


def _numbers_of(text):
    return [{k: v for k, v in row.items() if k != "seconds_per_epoch"}
            for row in csv.DictReader(text.splitlines())]  # fmt: skip


def _numbers(path):
    return _numbers_of(path.read_text())


def test_train_with_seeds_reports_mean_and_std(tmp_path, capsys):
    assert (
        cli.main(["train", "--seeds", "2", "--method", "flooding", *TINY, "--out", str(tmp_path)])
        == 0
    )
    summary = json.loads((tmp_path / "seeds.json").read_text())
    accuracies = [json.loads((tmp_path / f"seed={s}" / "result.json").read_text())["test_accuracy"]
                  for s in (0, 1)]  # fmt: skip
    assert summary["seeds"] == [0, 1]
    assert summary["test_accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert "2 seeds: best test accuracy" in capsys.readouterr().out
    assert "eq2_bound" not in json.loads((tmp_path / "seed=0" / "result.json").read_text())


def test_the_papers_numbers_stand_beside_matching_rows():
    assert paper.reported("vgg16", "cifar10", "gmp:samples=10") == (94.45, 0.158)
    assert paper.reported("preactresnet18", "svhn_cropped", "erm") == (97.05, 0.063)
    assert paper.reported("mlp", "cifar10", "erm") is None
    assert paper.reported("vgg16", "cifar10", "sam") is None  # SAM is not in the tables
    config = TrainConfig(dataset="cifar100", model="preactresnet18")
    runs = [_Run(0.5, 0.4, 2.0), _Run(0.7, 0.6, 4.0)]
    row = compare.row(config, compare.Cell("mixup", 0.0, runs))
    assert row.paper_mean == 78.22 and row.best_mean == pytest.approx(60.0)
    assert "| 78.22 ± 0.21 |" in compare.markdown(config, [row], 2)


class _Run:
    def __init__(self, best, final, seconds):
        self.best_test_accuracy, self.test_accuracy, self.seconds_per_epoch = best, final, seconds


def test_differences_within_two_standard_errors_are_called_unresolved():
    erm = Row("erm", 0.0, 10, 94.0, 0.2, 93.0, 0.2, 1.0, math.nan, math.nan)
    close = erm._replace(method="gmp", best_mean=94.1)
    far = erm._replace(method="gmp", best_mean=94.5)
    assert "unresolved" in compare.versus(close, erm)
    assert "better beyond two standard errors" in compare.versus(far, erm)
    assert "one seed: unresolved" in compare.versus(far._replace(seeds=1), erm)
