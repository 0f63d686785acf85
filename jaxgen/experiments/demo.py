"""``jaxgen demo``: Figures 1 and 2 of Wang & Mao (ICLR 2022) at small scale on MNIST-1D.

A width sweep and a label-noise sweep (Figure 1: Eq. 2 bound against the measured gap)
and the dispersion dynamics of a long noisy run (Figure 2), written as ``report.md`` with
PNG figures, a table of every run and one sentence per claim of the paper, each computed
from the numbers of this run rather than written in advance.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxgen.experiments import compare, loop, methods, report, results
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.errors import ConfigError
from jaxgen.experiments.results import EpochMetrics, RunResult

R = 0.1
MARKER = ".jaxgen-demo"


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    widths: tuple[int, ...]
    noise_levels: tuple[float, ...]
    sweep: TrainConfig  # the base of both sweeps
    sweep_width: int  # the width of the noise sweep
    width_noise: float  # the label noise of the width sweep
    dynamics: TrainConfig  # the long noisy run of Figure 2
    comparison: TrainConfig  # the base of the methods' comparison (no bounds)
    seeds: int  # of the comparison


def plan(quick: bool) -> DemoPlan:
    if quick:
        base = TrainConfig(
            epochs=3,
            batch_size=50,
            lr=0.1,
            num_train=500,
            hessian_probes=4,
            flatness_samples=4,
            R=R,
        )
        compared = dataclasses.replace(base, width=32, label_noise=0.2, bounds=False)
        return DemoPlan(
            (8, 32),
            (0.0, 0.4),
            base,
            32,
            0.0,
            dataclasses.replace(base, epochs=4, width=32, label_noise=0.2, **DYNAMICS_INSTRUMENTS),
            dataclasses.replace(compared, method=methods.ERM()),
            2,
        )
    base = TrainConfig(
        epochs=100,
        batch_size=64,
        lr=0.1,
        hessian_probes=100,
        flatness_samples=32,
        R=R,
        checkpoint_every=62 * 50,
    )
    dynamics = dataclasses.replace(
        base, epochs=300, width=512, label_noise=0.2, **DYNAMICS_INSTRUMENTS, instruments_every=10
    )
    compared = dataclasses.replace(base, epochs=40, width=512, label_noise=0.2, bounds=False)
    return DemoPlan(
        (32, 128, 512, 2048), (0.0, 0.2, 0.4, 0.6), base, 512, 0.0, dynamics, compared, 3
    )


# The Figure 2 run also measures the Hessian's top eigenvalue and the mean GSNR.
DYNAMICS_INSTRUMENTS = {"instruments": "hessian-max,gsnr", "instruments_examples": 256}

# Per-example clipping in the comparison: at the batch's 0.8-quantile norm, i.e. the
# fifth of each batch with the largest gradients is clipped, where a label noise of 0.2
# puts the mislabelled examples (their gradients are the largest).
CLIP_QUANTILE = 0.8


def compared_methods(quick: bool) -> list[tuple[str, methods.Method]]:
    """ERM, GMP, dynamic clipping (from epoch 15, the paper's T_c for the MLP), SAM and
    per-example clipping (``CLIP_QUANTILE``)."""
    start = 1 if quick else 15
    return [
        ("erm", methods.ERM()),
        ("gmp", methods.GMP()),
        ("dgc", methods.DGC(start_epoch=start)),
        ("sam", methods.SAM()),
        ("per-example-clip", methods.PerExampleClip(quantile=CLIP_QUANTILE)),
    ]


def run(out: Path, *, quick: bool = False, console=None) -> Path:
    """Run the demo into ``out`` and return the path of ``report.md``.

    ``out/runs`` is the demo's own scratch space: a previous demo's runs there (marked by
    the file ``MARKER``, which the demo writes first) are replaced, so that every number
    in the report comes from this invocation. A ``runs`` folder without the marker was
    not written by the demo: it is left alone and the demo refuses to start.
    """
    started = time.perf_counter()
    settings = plan(quick)
    say = console.print if console is not None else print
    _claim(out / "runs", say)

    finished: dict[TrainConfig, RunResult] = {}

    def one(config: TrainConfig, folder: str) -> RunResult:
        if config in finished:  # the noise sweep's p = 0 run is a width-sweep run
            return finished[config]
        say(f"[{time.perf_counter() - started:5.0f} s] {folder}")
        finished[config] = loop.run(config, out / "runs" / folder)
        return finished[config]

    width_runs = [
        one(
            dataclasses.replace(settings.sweep, width=w, label_noise=settings.width_noise),
            f"width={w}",
        )
        for w in settings.widths
    ]
    noise_runs = [
        one(
            dataclasses.replace(settings.sweep, width=settings.sweep_width, label_noise=p),
            f"noise={p}",
        )
        for p in settings.noise_levels
    ]
    dynamics = one(settings.dynamics, "dynamics")
    epochs = dynamics.epochs
    say(f"[{time.perf_counter() - started:5.0f} s] comparison of methods over seeds")
    cells = compare.run(
        settings.comparison,
        compared_methods(quick),
        settings.seeds,
        out / "runs" / "compare",
        say=lambda text: None,
    )
    rows = [compare.row(settings.comparison, cell) for cell in cells]

    report.sweep_figure(
        settings.widths,
        width_runs,
        out / "figure1_width.png",
        xlabel="hidden width",
        title="MLP on MNIST-1D: width",
        log_x=True,
    )
    report.sweep_figure(
        settings.noise_levels,
        noise_runs,
        out / "figure1_noise.png",
        xlabel="label noise",
        title="MLP on MNIST-1D: label noise",
    )
    title = f"MLP 40-{settings.dynamics.width}-10, label noise {settings.dynamics.label_noise}"
    report.dispersion_figure(epochs, out / "figure2.png", title=title)
    curvature = results.read_instruments(out / "runs" / "dynamics")
    report.instruments_figure(curvature, out / "figure2_instruments.png", title=title)
    text = _report(
        settings,
        width_runs,
        noise_runs,
        list(finished.values()),
        epochs,
        rows,
        time.perf_counter() - started,
        curvature,
    )
    path = report.write_text_atomic(out / "report.md", text)
    say(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    return path


def _claim(runs: Path, say) -> None:
    """Make ``runs`` the demo's own, empty folder, deleting only a previous demo's."""
    if runs.exists():
        if not (runs / MARKER).is_file():
            raise ConfigError(
                f"{runs} exists and was not written by jaxgen demo (no {MARKER} in it); "
                "choose another --out, or move that folder yourself"
            )
        say(f"replacing the previous demo's runs in {runs}")
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    (runs / MARKER).write_text("written by jaxgen demo, which may replace this folder\n")


def _ranks(values) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(values, np.float64))).astype(np.float64)


def spearman(a, b) -> float:
    """Spearman's rank correlation (no ties expected in these measurements)."""
    ra, rb = _ranks(a), _ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def trend_sentence(setting: str, values, runs) -> str:
    gaps = [r.gap for r in runs]
    bound_values = [r.eq2_bound for r in runs]
    steps = len(values) - 1
    same = sum(
        np.sign(gaps[i + 1] - gaps[i]) == np.sign(bound_values[i + 1] - bound_values[i])
        for i in range(steps)
    )
    rho = spearman(gaps, bound_values)
    verdict = (
        "follows"
        if same == steps
        else ("mostly follows" if same > steps / 2 else "does not follow")
    )
    return (
        f"Over {setting} {', '.join(map(str, values))}, the bound {verdict} the gap's trend: "
        f"they move in the same direction in {same} of {steps} steps (Spearman ρ = {rho:.2f})."
    )


def double_descent(epochs: Sequence[EpochMetrics]) -> tuple[bool, str]:
    """Whether the dispersion falls, rises to a peak and falls again (smoothed over 5 epochs)."""
    values = np.asarray([row.dispersion for row in epochs], np.float64)
    if values.size < 8:
        return (
            False,
            f"The run is too short ({values.size} epochs) to judge the dispersion's shape.",
        )
    smooth = np.convolve(values, np.ones(5) / 5, mode="valid")
    for first in range(1, smooth.size - 2):
        if smooth[first] > smooth[first - 1] or smooth[first] > smooth[first + 1]:
            continue  # not a local minimum
        peak = first + 1 + int(np.argmax(smooth[first + 1 :]))
        if smooth[peak] < 1.1 * smooth[first] or peak == smooth.size - 1:
            continue
        end = float(smooth[-1])
        if end < 0.9 * smooth[peak]:
            return True, (
                f"Yes: the gradient dispersion falls from {values[0]:.3g} to {smooth[first]:.3g} "
                f"(epoch ≈ {first + 3}, 'generalization'), rises to {smooth[peak]:.3g} (epoch ≈ "
                f"{peak + 3}, 'memorization', while train accuracy on the noisy labels climbs), "
                f"and falls again to {end:.3g} by the last epoch: the epoch-wise double descent "
                f"of Figure 2 appears."
            )
    return False, (
        "No: the dispersion does not fall, rise to a peak and fall again in this run "
        f"(first {values[0]:.3g}, last {values[-1]:.3g}); the double descent of Figure 2 does not "
        "appear at this length and scale."
    )


def _table(setting: str, values, runs) -> list[str]:
    lines = [
        f"| {setting} | train acc. | test acc. | gap | Eq. 2 bound | bound / gap "
        "| Theorem 1 (σ*, MC flatness) | Neu et al. (σ*) | Σλ²V_t | Tr H |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for value, r in zip(values, runs, strict=True):
        ratio = f"{r.eq2_bound / r.gap:.3g}" if r.gap > 0 else "gap ≤ 0"
        lines.append(
            f"| {value} | {r.train_accuracy:.3f} | {r.test_accuracy:.3f} | {r.gap:.4f} | "
            f"{r.eq2_bound:.4f} | {ratio} | {r.theorem1_bound:.4f} | {r.neu2021_bound:.4f} | "
            f"{r.sum_lr2_variance:.3g} | {r.hessian_trace:.3g} ± {r.hessian_trace_stderr:.2g} |"
        )
    return lines


def looseness_sentence(runs) -> str:
    """Is Eq. 2 above the gap in each distinct run, and by how much."""
    above = sum(r.eq2_bound >= r.gap for r in runs)
    ratios = [r.eq2_bound / r.gap for r in runs if r.gap > 0]
    loose = (
        f"; where the gap is positive the bound is {min(ratios):.3g}× to {max(ratios):.3g}× it"
        if ratios
        else ""
    )
    return (
        f"In {above} of {len(runs)} distinct runs{loose} (with R = {R}; the bound scales as "
        "R^(2/3), so this depends on that assumption)."
    )


def clipping_sentence(rows) -> str:
    """What per-example clipping did to the test accuracy, against ERM (``compare.versus``:
    a difference within two standard errors is unresolved)."""
    by_method = {row.method: row for row in rows}
    clip, erm = by_method.get("per-example-clip"), by_method.get("erm")
    if clip is None or erm is None:
        return ""
    return (
        "Does clipping each example's gradient help under label noise? Best test "
        f"accuracy {clip.best_mean:.1f} ± {clip.best_std:.1f} % against ERM's "
        f"{erm.best_mean:.1f} ± {erm.best_std:.1f} % ({compare.versus(clip, erm)}); final "
        f"{clip.final_mean:.1f} ± {clip.final_std:.1f} % against {erm.final_mean:.1f} ± "
        f"{erm.final_std:.1f} %."
    )


def instruments_sentence(rows, epochs) -> str:
    """What the top eigenvalue and the mean GSNR did over the Figure 2 run, beside the
    dispersion's peak (the memorisation phase, ``double_descent``)."""
    if not rows:
        return "The instruments were not measured."
    measured = [int(row["epoch"]) for row in rows]

    def course(name, label):
        values = [row[name] for row in rows]
        high, low = int(np.argmax(values)), int(np.argmin(values))
        return (
            f"{label} goes from {values[0]:.3g} (epoch {measured[0]}) to {values[-1]:.3g} "
            f"(epoch {measured[-1]}), highest {values[high]:.3g} at epoch {measured[high]} and "
            f"lowest {values[low]:.3g} at epoch {measured[low]}"
        )

    dispersion = np.asarray([row.dispersion for row in epochs], np.float64)
    peak = int(np.nanargmax(dispersion)) + 1 if dispersion.size else 0
    sentence = (
        f"Measured every {measured[1] - measured[0] if len(measured) > 1 else 1} epochs on "
        f"256 training examples: {course('hessian_max', 'the top eigenvalue of H')}; "
        f"{course('gsnr', 'the mean GSNR')}. The dispersion peaks at epoch {peak}"
    )
    before = [row for row in rows if row["epoch"] <= peak]
    after = [row for row in rows if row["epoch"] > peak]
    if not before or not after:
        return sentence + "."
    averages = {
        name: (np.mean([r[name] for r in before]), np.mean([r[name] for r in after]))
        for name in ("hessian_max", "gsnr")
    }
    return sentence + (
        "; up to that peak (the memorisation phase) the top eigenvalue averages "
        f"{averages['hessian_max'][0]:.3g} and the GSNR {averages['gsnr'][0]:.3g}, after it "
        f"{averages['hessian_max'][1]:.3g} and {averages['gsnr'][1]:.3g}."
    )


def _report(
    settings: DemoPlan, width_runs, noise_runs, runs, epochs, rows, seconds, curvature
) -> str:
    """``runs``: every distinct run of the sweeps, each once; ``rows``: the comparison."""
    base = settings.sweep
    _, descent = double_descent(epochs)
    lines = [
        "# jaxgen demo: Wang & Mao (ICLR 2022) on MNIST-1D",
        "",
        f"MLP 40-width-10 trained with {base.optimizer_description}, learning rate {base.lr}, "
        f"batch {base.batch_size}, {base.epochs} epochs per sweep run (the Figure 2 run: "
        f"{settings.dynamics.epochs}); n = {width_runs[0].n} training examples, "
        f"{'generated offline by mnist1d'}. The gap is test − train cross-entropy on the full "
        f"splits (test labels are never noisy). Bounds use R = {R} (the authors' choice: "
        "cross-entropy is unbounded, so R is an assumption, not a property of the loss), "
        "V_t = dispersion / b measured at every step from the same gradient as the update, "
        f"and Tr H by Hutchinson on n/10 training examples. Took {seconds:.0f} s.",
        "",
        "## Figure 1: bound and gap",
        "",
        f"Width sweep (label noise {settings.width_noise}):",
        "",
        "![width](figure1_width.png)",
        "",
        *_table("width", settings.widths, width_runs),
        "",
        f"Label-noise sweep (width {settings.sweep_width}):",
        "",
        "![noise](figure1_noise.png)",
        "",
        *_table("label noise", settings.noise_levels, noise_runs),
        "",
        "## Figure 2: gradient dispersion per epoch",
        "",
        "![dispersion](figure2.png)",
        "",
        "The same run's top Hessian eigenvalue (Lanczos) and mean gradient signal-to-noise "
        "ratio (Liu et al., ICLR 2020), `runs/dynamics/instruments.csv`:",
        "",
        "![instruments](figure2_instruments.png)",
        "",
        instruments_sentence(curvature, epochs),
        "",
        "## The paper's claims, checked on these runs",
        "",
        "- Does the bound follow the gap's trend? "
        + trend_sentence("widths", settings.widths, width_runs)
        + " "
        + trend_sentence("label-noise levels", settings.noise_levels, noise_runs),
        f"- Is Eq. 2 above the measured gap? {looseness_sentence(runs)}",
        f"- Does the dispersion descend twice? {descent}",
        "",
        "## Implications: GMP, dynamic gradient clipping, SAM and per-example clipping against ERM",
        "",
        "The paper's Algorithm 2 (GMP, k = 3, σ = 0.03, ρ = 0.5) and Algorithm 1 (dynamic "
        "clipping, α = 0.1, G = 50) with SAM (ρ = 0.05), per-example clipping at each "
        f"batch's {CLIP_QUANTILE:g}-quantile gradient norm (`jaxgen.clipped_grad`: the "
        "largest per-example gradients, where mislabelled examples are, are cut to that "
        "norm) and ERM, on the MLP of the sweeps "
        f"with label noise {settings.comparison.label_noise}, {settings.comparison.epochs} "
        f"epochs, {settings.seeds} seeds each (`runs/compare/compare.md`; the paper's tables "
        "average 10 runs of VGG16 and PreActResNet18 on SVHN and CIFAR: this is a small "
        "check, not a reproduction of them):",
        "",
        *compare.markdown(settings.comparison, rows, settings.seeds).splitlines()[4:],
        "",
        clipping_sentence(rows),
        "",
        "Every number above is in `runs/*/result.json` (per-epoch metrics in `metrics.csv`, "
        "per-step λ_t, losses and V_t in `steps.npz`).",
        "",
    ]
    return "\n".join(lines)
