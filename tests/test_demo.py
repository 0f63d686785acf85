"""The demo's verdicts, on synthetic curves whose answer is known."""

import collections

import numpy as np

from jaxgen.experiments import demo
from jaxgen.experiments.results import EpochMetrics

Run = collections.namedtuple("Run", "gap eq2_bound")


def _epochs(values):
    return [EpochMetrics(i + 1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, v) for i, v in enumerate(values)]


def test_double_descent_is_detected_when_present():
    t = np.arange(120)
    fall, rise, fall_again = 220 - 3 * t, 175 + 1.5 * (t - 15), 242 - 2 * (t - 60)
    curve = np.where(t < 15, fall, np.where(t < 60, rise, fall_again))
    found, sentence = demo.double_descent(_epochs(curve))
    assert found and sentence.startswith("Yes")


def test_double_descent_is_not_claimed_for_a_monotone_fall_or_a_single_dip():
    assert not demo.double_descent(_epochs(np.linspace(200, 10, 100)))[0]
    t = np.arange(100)
    assert not demo.double_descent(_epochs(np.where(t < 30, 200 - 3 * t, 110 + 2 * (t - 30))))[0]


def _runs(gaps, bound_values):
    return [Run(g, b) for g, b in zip(gaps, bound_values, strict=True)]


def test_trend_sentence_counts_agreeing_steps():
    agree = demo.trend_sentence("widths", [1, 2, 3], _runs([0.1, 0.2, 0.3], [1, 2, 3]))
    assert "the bound follows the gap's trend" in agree and "2 of 2 steps" in agree
    mostly = demo.trend_sentence("widths", [1, 2, 3, 4], _runs([1, 2, 3, 4], [1, 2, 3, 2.5]))
    assert "mostly follows" in mostly and "2 of 3 steps" in mostly
    opposite = demo.trend_sentence("widths", [1, 2, 3], _runs([1, 2, 3], [3, 2, 1]))
    assert "does not follow" in opposite and "ρ = -1.00" in opposite


def test_the_comparison_is_erm_gmp_clipping_sam_and_per_example_clipping():
    entries = dict(demo.compared_methods(quick=False))
    assert list(entries) == ["erm", "gmp", "dgc", "sam", "per-example-clip"]
    assert entries["per-example-clip"].quantile == demo.CLIP_QUANTILE
    assert entries["dgc"].start_epoch == 15 and entries["gmp"].samples == 3
    settings = demo.plan(quick=False)
    assert settings.seeds >= 3 and settings.comparison.label_noise > 0
    assert not settings.comparison.bounds


def test_the_looseness_sentence_counts_each_run_once_and_gives_the_ratio_range():
    runs = [Run(0.1, 0.5), Run(0.2, 0.3), Run(-0.05, 0.4), Run(0.5, 0.25)]
    sentence = demo.looseness_sentence(runs)
    assert sentence.startswith("In 3 of 4 distinct runs; where the gap is positive the bound")
    assert "is 0.5× to 5× it" in sentence


def test_the_clipping_sentence_reads_the_comparison():
    from jaxgen.experiments.compare import Row

    def row(method, best, std):
        return Row(method, 0.2, 3, best, std, best - 1, std, 0.1, float("nan"), float("nan"))

    sentence = demo.clipping_sentence([row("erm", 60.0, 0.5), row("per-example-clip", 64.0, 0.5)])
    assert "Best test accuracy 64.0 ± 0.5 % against ERM's 60.0 ± 0.5 %" in sentence
    assert "better beyond two standard errors" in sentence
    assert demo.clipping_sentence([row("erm", 60.0, 0.5)]) == ""


def test_the_instruments_sentence_reads_the_figure_2_run():
    rows = [
        {"epoch": 10.0, "hessian_max": 4.0, "gsnr": 0.1},
        {"epoch": 20.0, "hessian_max": 6.0, "gsnr": 0.2},
        {"epoch": 30.0, "hessian_max": 2.0, "gsnr": 0.4},
    ]
    epochs = [_epoch(d) for d in [1.0] * 19 + [3.0] + [1.0] * 10]  # the dispersion peaks at 20
    sentence = demo.instruments_sentence(rows, epochs)
    assert "the top eigenvalue of H goes from 4 (epoch 10) to 2 (epoch 30)" in sentence
    assert "highest 6 at epoch 20" in sentence and "The dispersion peaks at epoch 20" in sentence
    assert "the top eigenvalue averages 5 and the GSNR 0.15, after it 2 and 0.4" in sentence
    assert demo.instruments_sentence([], epochs) == "The instruments were not measured."


def _epoch(dispersion):
    from jaxgen.experiments.results import EpochMetrics

    nan = float("nan")
    return EpochMetrics(1, nan, nan, nan, nan, nan, nan, dispersion)
