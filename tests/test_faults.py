"""Faults injected into real ``jaxgen bound`` processes (``fault_injection.py``).

Twenty tries: each signal (SIGINT, SIGTERM, kill -9, two SIGINTs) at a random moment of
five phases, every phase of a run hit by one signal or more; then a save cut off by
kill -9 next to a damaged checkpoint. ``python tests/fault_injection.py`` runs the long
version (200 tries per signal).
"""

import json
import random
import shutil
import subprocess

import fault_injection as faults
import pytest

from jaxgen.experiments.checkpoint import TMP_SUFFIX


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> faults.Reference:
    return faults.reference(tmp_path_factory.mktemp("reference"))


SCHEDULE = {
    "SIGINT": ("python", "start", "segment", "checkpoint", "write"),
    "SIGTERM": ("import", "prepare", "evaluate", "estimates", "exit"),
    "SIGKILL": ("restore", "segment", "checkpoint", "estimates", "write"),
    "SIGINT*2": ("import", "restore", "evaluate", "checkpoint", "exit"),
}


def test_the_schedule_covers_every_signal_and_phase():
    assert set(SCHEDULE) == set(faults.SIGNALS)
    assert {phase for phases in SCHEDULE.values() for phase in phases} == set(faults.PHASES)


@pytest.mark.parametrize("kind", faults.SIGNALS)
def test_a_signal_in_any_phase_ends_as_documented_and_resumes_to_the_same_result(
    reference, kind, tmp_path
):
    rng = random.Random(faults.SIGNALS.index(kind))
    outcomes = [
        faults.run_in(tmp_path, reference, faults.plan(reference, kind, rng, phase))
        for phase in SCHEDULE[kind]
    ]
    assert not any(o.problems for o in outcomes), faults.table(outcomes)


def test_a_save_cut_off_beside_a_damaged_checkpoint_costs_one_warning_line_each(
    reference, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(reference.folder, run)
    for name in ("result.json", "metrics.csv", "steps.npz", "dispersion.png"):
        (run / name).unlink()
    checkpoints = run / "checkpoints"  # 4 and 6: 6 becomes a save cut off by kill -9,
    (checkpoints / "6").rename(checkpoints / f"6{TMP_SUFFIX}")  # and a damaged 5 the newest
    (checkpoints / f"6{TMP_SUFFIX}" / "commit_success.txt").unlink()
    shutil.copytree(checkpoints / "4", checkpoints / "5")
    damaged = [p for p in (checkpoints / "5" / "state").rglob("*") if p.parent.name == "d"]
    assert damaged
    for array in damaged:
        array.write_bytes(array.read_bytes()[:10])
    done = subprocess.run(
        [*faults.command(), *faults.ARGS, "--out", str(run), "--resume"],
        capture_output=True,
        text=True,
        timeout=faults.TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("jaxgen bound: warning: ") for line in lines)
    assert f"removed 6{TMP_SUFFIX} from {checkpoints}" in lines[0], lines
    assert "checkpoint step 5" in lines[1] and "moved it aside to 5.damaged" in lines[1], lines
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "5.damaged", "6"]
    assert faults._compare(reference.result, run / "result.json") == []
    assert json.loads((run / "result.json").read_text())["num_steps"] == 6
