import json
import re

import pytest

from jaxgen import cli
from jaxgen.experiments import methods
from jaxgen.experiments.config import TrainConfig

TINY = [
    "--epochs",
    "1",
    "--width",
    "8",
    "--num-train",
    "60",
    "--batch-size",
    "20",
    "--hessian-probes",
    "4",
    "--flatness-samples",
    "4",
    "--no-progress",
]


def test_bound_writes_the_result_with_the_documented_keys(tmp_path, capsys):
    assert cli.main(["bound", *TINY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    for key in (
        "gap",
        "train_loss",
        "test_loss",
        "train_accuracy",
        "test_accuracy",
        "num_steps",
        "R",
        "sum_lr2_variance",
        "hessian_trace",
        "eq2_bound",
        "theorem1_bound",
        "neu2021_bound",
        "config",
    ):
        assert key in result, key
    assert result["config"]["width"] == 8
    assert "Eq. 2 bound" in capsys.readouterr().out


def test_sweep_runs_each_value_and_draws_figure_1(tmp_path):
    assert cli.main(["sweep", *TINY, "--widths", "4,8", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [run["width"] for run in summary["runs"]] == [4, 8]
    assert (tmp_path / "figure1.png").exists() and (tmp_path / "width=4" / "result.json").exists()


def test_presets_then_flags_then_the_method_make_the_config():
    args = cli._parser().parse_args(
        ["bound", "--preset", "paper-mnist-mlp", "--epochs", "3", "--method", "gmp",
         "--gmp-sigma", "0.05", "--dispersion-method", "vmap", "--lr-milestones", "1,2"]
    )  # fmt: skip
    config = cli.config_from_args(args)
    assert (config.dataset, config.model, config.width, config.batch_size) == (
        "mnist",
        "mlp",
        512,
        60,
    )
    assert (config.lr, config.epochs, config.lr_milestones) == (0.01, 3, (1, 2))
    assert config.method == methods.GMP(sigma=0.05) and config.dispersion_method == "vmap"
    assert cli.config_from_args(cli._parser().parse_args(["bound"])) == TrainConfig()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bound", "--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
        (["bound", "--label-noise", "1.5"], r"--label-noise: must lie in [0, 1], got 1.5"),
        (["bound", "--lr", "abc"], "--lr: must be a finite number > 0, got abc"),
        (["bound", "--model", "resnet1000"], "invalid choice"),
        (["bound", "--lr-milestones", "a,b"], "--lr-milestones: must be an integer >= 1, got a"),
        (["sweep"], "one of the arguments --widths --noise-levels is required"),
        (["nonsense"], "invalid choice"),
        ([], "the following arguments are required"),
        (["bound", "--momentum", "1.5"], r"--momentum: must lie in [0, 1), got 1.5"),
        (["bound", "--method", "sgd"], "--method: invalid choice: 'sgd'"),
        (["bound", "--dispersion-method", "exact"], "invalid choice: 'exact'"),
        (["bound", "--gmp-rho", "2"], r"--gmp-rho: must lie in [0, 1], got 2"),
        (["bound", "--gmp-sigma", "0.1"], "--gmp-sigma applies to --method gmp, not to erm"),
        (
            ["bound", "--method", "dgc", "--gmp-samples", "2"],
            "--gmp-samples applies to --method gmp",
        ),
        (
            ["bound", "--num-train", "100000", "--out", "/nonexistent/never"],
            "num_train must be <= the 4000 training",
        ),
        (["bound", "--model", "alexnet", *TINY], "model alexnet: model alexnet needs image inputs"),
        (
            ["bound", "--dataset", "cifar10", "--data-dir", "/nonexistent", *TINY],
            "cifar10 is not prepared in /nonexistent",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_divergence_exits_1_with_one_line(tmp_path, capsys):
    assert cli.main(["bound", *TINY, "--lr", "1e30", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite training loss" in err


def test_demo_quick_writes_the_report_and_can_run_again(tmp_path):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "report.md").read_text()
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0  # replaces its runs
    text = (tmp_path / "report.md").read_text()
    for figure in ("figure1_width.png", "figure1_noise.png", "figure2.png"):
        assert (tmp_path / figure).stat().st_size > 1000 and figure in text
    assert "Does the bound follow the gap's trend?" in text
    assert "Does the dispersion descend twice?" in text
    untimed = lambda report: re.sub(r"Took \d+ s\.", "", report)  # noqa: E731
    assert untimed(first) == untimed(text)  # the same numbers, run again
