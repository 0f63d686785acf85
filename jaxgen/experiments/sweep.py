"""Figure 1 of Wang & Mao (ICLR 2022): one run per value of a swept setting.

Each run writes its own folder ``OUT/<field>=<value>``; the sweep then draws the Eq. 2
bound and the measured gap against the setting (``figure1.png``, log y) and writes
``sweep.json`` with the gap and bound of every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxgen.experiments import loop, report
from jaxgen.experiments.callbacks import Callback
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.results import RunResult

SWEEPABLE = {"width": "width", "label_noise": "label noise"}  # field -> axis label


def run(
    config: TrainConfig,
    field: str,
    values: Sequence[Any],
    out: str | Path,
    *,
    resume: bool = False,
    callbacks: Callable[[], Sequence[Callback]] = tuple,
    say: Callable[[str], None] = print,
    mesh: Any = None,
) -> list[RunResult]:
    """Run ``config`` with ``field`` set to each of ``values``; draw and summarise.

    ``callbacks()`` makes fresh callbacks for each run.
    """
    if field not in SWEEPABLE:
        raise ValueError(f"field must be one of {', '.join(SWEEPABLE)}, got {field!r}")
    out = Path(out)
    results = []
    for value in values:
        say(f"{field} = {value}")
        result = loop.run(
            dataclasses.replace(config, **{field: value}),
            out / f"{field}={value}",
            resume=resume,
            callbacks=callbacks(),
            mesh=mesh,
        )
        say(f"  gap {result.gap:.4f}   Eq. 2 bound {result.eq2_bound:.4f}")
        results.append(result)
    report.sweep_figure(
        values,
        results,
        out / "figure1.png",
        xlabel=SWEEPABLE[field],
        title=f"{config.model} on {config.dataset}",
        log_x=field == "width",
    )
    summary = [
        {field: value, "gap": r.gap, "eq2_bound": r.eq2_bound}
        for value, r in zip(values, results, strict=True)
    ]
    report.write_json_atomic(out / "sweep.json", {"swept": field, "runs": summary})
    return results
