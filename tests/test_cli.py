import json
import re
import shutil
import subprocess

import pytest

from jaxgen import cli
from jaxgen.experiments import flags, methods
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.errors import RunWarning

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
    "--mesh",
    "data=1",  # the suite simulates 8 devices; these runs stay on one
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


def test_dp_sgd_from_the_command_line_reports_the_privacy_spent(tmp_path, capsys):
    argv = ["train", *TINY, "--method", "dp-sgd", "--dp-sgd-noise-multiplier", "2"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    privacy = json.loads((tmp_path / "result.json").read_text())["privacy"]
    assert privacy["steps"] == 3 and privacy["sampling_rate"] == 20 / 60
    assert (
        privacy["epsilon"]
        == methods.DPSGD(noise_multiplier=2.0).privacy(n=60, batch_size=20, steps=3)["epsilon"]
    )
    out = capsys.readouterr().out
    assert "privacy spent" in out and f"ε = {privacy['epsilon']:.3g}" in out


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
    with pytest.warns(RunWarning, match="--epochs 3 replaces the preset's 500"):
        config = flags.config_from_args(args)
    assert (config.dataset, config.model, config.width, config.batch_size) == (
        "mnist",
        "mlp",
        512,
        60,
    )
    assert (config.lr, config.epochs, config.lr_milestones) == (0.01, 3, (1, 2))
    assert config.method == methods.GMP(sigma=0.05) and config.dispersion_method == "vmap"
    assert flags.config_from_args(cli._parser().parse_args(["bound"])) == TrainConfig()


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
        (
            ["bound", "--method", "dgc", "--dgc-alpha", "2"],
            r"--dgc-alpha: must lie in (0, 1], got 2",
        ),
        (["bound", "--gmp-sigma", "0.1"], "--gmp-sigma applies to --method gmp, not to erm"),
        (
            ["bound", "--method", "dgc", "--gmp-samples", "2"],
            "--gmp-samples applies to --method gmp",
        ),
        (
            ["bound", "--num-train", "100000", "--mesh", "data=1", "--out", "/nonexistent/never"],
            "num_train must be <= the 4000 training",
        ),
        (["bound", "--model", "alexnet", *TINY], "error: model alexnet needs image inputs"),
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
    subject = " ".join(err.split("error: ", 1)[1].split()[:2])  # e.g. "model alexnet"
    assert err.count(subject) == 1, err  # a message does not repeat what it is about


def test_divergence_exits_1_with_one_line_that_says_what_works(tmp_path, capsys):
    argv = ["bound", *TINY, "--lr", "1e30", "--checkpoint-every", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite training loss or weights at step" in err
    assert "start over with a lower --lr (this run: 1e+30) and another --out" in err
    if "last finite checkpoint" in err:  # the message names only a checkpoint that exists
        step = int(re.search(r"checkpoint \(step (\d+)\)", err).group(1))
        assert (tmp_path / "checkpoints" / str(step)).is_dir()
    assert "None" not in err
    assert cli.main([*argv, "--lr", "0.1"]) == 2  # what it says: the old --out is refused
    assert "already holds checkpoints" in capsys.readouterr().err


def test_demo_quick_writes_the_report_and_can_run_again(tmp_path):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "report.md").read_text()
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0  # replaces its runs
    text = (tmp_path / "report.md").read_text()
    for figure in ("figure1_width.png", "figure1_noise.png", "figure2.png"):
        assert (tmp_path / figure).stat().st_size > 1000 and figure in text
    assert "Does the bound follow the gap's trend?" in text
    assert "Does the dispersion descend twice?" in text

    def untimed(report):  # the run time and the comparison's seconds per epoch
        report = re.sub(r"Took \d+ s\.", "", report)
        return re.sub(r"\| [\d.]+ \| (—|[\d.]+ ± [\d.]+) \|\n", "|\n", report)

    assert untimed(first) == untimed(text)  # the same numbers, run again
    folders = [p for p in (tmp_path / "runs").iterdir() if p.is_dir() and p.name != "compare"]
    assert f" of {len(folders)} distinct runs" in text and "| bound / gap |" in text
    assert (tmp_path / "runs" / ".jaxgen-demo").is_file()
    assert "Best test accuracy against ERM at the same label noise:" in text
    assert (tmp_path / "runs" / "compare" / "sam" / "seed=1" / "result.json").is_file()
    assert "Does clipping each example's gradient help under label noise?" in text
    assert (tmp_path / "runs" / "compare" / "per-example-clip" / "seed=1").is_dir()


def _exit_code(argv):
    try:
        return cli.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_settings_that_do_nothing_warn_one_line_each(tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    argv = ["bound", "--mesh", "data=1", "--preset", "paper-mnist-mlp", "--dataset", "mnist1d",
            "--epochs", "2", "--lr-milestones", "1,5", "--always-wrong",
            "--out", str(blocked)]  # fmt: skip
    assert _exit_code(argv) == 2  # the --out is refused after the warnings
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "jaxgen bound: warning: --dataset mnist1d replaces the preset's mnist: the run is no "
        "longer the setting of paper-mnist-mlp"
    )
    assert lines[1].endswith("warning: --epochs 2 replaces the preset's 500: the run is no "
                             "longer the setting of paper-mnist-mlp")  # fmt: skip
    assert "warning: lr_milestones 5 not before the last epoch (2)" in lines[2]
    assert "warning: always_wrong does nothing without label_noise > 0" in lines[3]
    assert len(lines) == 5 and "Traceback" not in "".join(lines)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, where):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    out = blocked if where == "a file" else blocked / "run"
    assert _exit_code(["bound", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}: cannot write there (" in err


def test_help_shows_each_flags_default(capsys):
    assert _exit_code(["bound", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("--lr LR learning rate λ (default 0.01)", "(default mnist1d)",
                    "GMP: σ of each perturbation (default 0.03)", "(default auto)"):  # fmt: skip
        assert default in text, default


def test_the_demo_refuses_a_runs_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    assert _exit_code(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "was not written by jaxgen demo" in capsys.readouterr().err
    assert (tmp_path / "runs" / "mine").is_dir()


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (``tmpfs(size, read_only)``): a real full or read-only disk."""
    mounted = []

    def mount(size: str, read_only: bool = False):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_a_read_only_out_is_refused_with_the_cause(tmpfs, capsys):
    out = tmpfs("64k", read_only=True) / "run"
    assert _exit_code(["bound", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"--out {out}: cannot write there (Read-only file system)" in err
    )


def test_a_full_disk_stops_with_one_line_and_its_checkpoint_resumes(tmpfs, tmp_path, capsys):
    out = tmpfs("300k") / "run"
    argv = ["bound", "--width", "512", "--epochs", "3", "--num-train", "60", "--batch-size", "20",
            "--hessian-probes", "2", "--flatness-samples", "2", "--checkpoint-every", "3",
            "--no-progress", "--mesh", "data=1"]  # fmt: skip
    assert _exit_code([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped: could not write" in err
    assert "No space left on device" in err and "Traceback" not in err
    step = int(re.search(r"the checkpoint of step (\d+)", err).group(1))
    copy = tmp_path / "moved"  # the user makes room: here, by moving the run elsewhere
    shutil.copytree(out, copy)
    assert _exit_code([*argv, "--out", str(copy), "--resume"]) == 0
    assert json.loads((copy / "result.json").read_text())["num_steps"] == 9 and step >= 3
