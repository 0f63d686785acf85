"""Interrupt a short ``jaxgen bound`` run inside each of its phases, resume it, and check
that it ended as documented and resumed to the uninterrupted run's result.

    python tests/fault_injection.py [--tries 200] [--signals SIGINT,SIGTERM,SIGKILL,SIGINT*2]
                                    [--seed 0] [--jobs 2]

prints, for each signal, a table of phase × outcome and the problems found; the exit
status is 1 if any try went wrong. ``tests/test_faults.py`` runs a few dozen tries.

A try: run the command with ``JAXGEN_PHASES`` set (``jaxgen.experiments.interrupts``
appends a line per phase), wait until the chosen phase begins, wait a random fraction of
that phase's length in an uninterrupted run, and send the signal to the process group
(as a terminal's Ctrl-C does); ``SIGINT*2`` sends a second SIGINT 0-0.3 s later. Then
check:

- the status: 130 (SIGINT), 143 (SIGTERM), -9 (SIGKILL), or 0 when the run was already
  writing its results (they are then complete); in the ``python`` phase, the few
  hundredths of a second before the launcher runs, Python's own handling: the process
  dies of the signal, or (SIGINT) of a ``KeyboardInterrupt`` in Python's startup code
  (counted apart, "before jaxgen");
- stderr: no traceback; on 130/143 its last line is the documented one (where the last
  checkpoint is and the command that resumes);
- unless the run completed: ``--resume`` exits 0 without a traceback and leaves no
  unfinished orbax folder;
- ``result.json`` equals the uninterrupted run's on every key but the timings.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = (
    "bound", "--width", "8", "--epochs", "2", "--num-train", "60", "--batch-size", "20",
    "--hessian-probes", "2", "--flatness-samples", "2", "--checkpoint-every", "2",
    "--no-progress",
)  # fmt: skip
SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL", "SIGINT*2")
PHASES = ("python", "import", "start", "prepare", "restore", "segment", "evaluate",
          "checkpoint", "estimates", "write", "exit")  # fmt: skip
TIMINGS = {"seconds", "seconds_per_epoch"}  # the keys that may differ between runs
EXPECTED = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9, "SIGINT*2": 130}
LAST_LINE = {
    130: r"jaxgen bound: interrupted( again: stopped at once)?[;,] ",
    143: r"jaxgen bound: stopped by SIGTERM( again: stopped at once)?[;,] ",
}
RESUME_HINT = (
    r"(the last checkpoint is step \d+ in \S+; resume: jaxgen .* --resume"
    r"|no checkpoint was written; run the same command again to start over"
    r"|before the run started; run it again)"
)
TIMEOUT = 300
LABELS = ("completed", "resumed", "before jaxgen", "wrong")  # what became of a try


def command() -> list[str]:
    """The ``jaxgen`` console script of this Python, else its launcher run directly."""
    script = Path(sys.executable).with_name("jaxgen")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import _jaxgen_launcher; _jaxgen_launcher.main()"]


@dataclasses.dataclass(frozen=True)
class Mark:
    """The ``occurrence``-th beginning of ``phase`` in a run and how long it lasted."""

    phase: str
    occurrence: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Reference:
    result: dict  # its result.json
    marks: tuple[Mark, ...]
    folder: Path  # its --out


@dataclasses.dataclass
class Outcome:
    signal: str
    phase: str
    delay: float
    status: int | None = None
    early: bool = False  # it came before the launcher ran (while Python started)
    resumed: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        if self.problems:
            return "wrong"
        if self.early:
            return "before jaxgen"
        return "resumed" if self.resumed else "completed"


def _phases(path: Path) -> list[tuple[float, str]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(float(t), name) for t, name in (line.split() for line in lines if " " in line)]


def reference(folder: Path) -> Reference:
    """The uninterrupted run: its result and the length of each phase."""
    phases = folder / "phases"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        [*command(), *ARGS, "--out", str(folder / "run")],
        env=os.environ | {"JAXGEN_PHASES": str(phases)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    ended = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{done.stderr}")
    marks, seen = [], collections.Counter()
    log = _phases(phases)
    marks.append(Mark("python", 0, log[0][0] - started))  # Python starting, before jaxgen
    for (time_, name), (next_time, _) in zip(log, [*log[1:], (ended, "")], strict=True):
        marks.append(Mark(name, seen[name], next_time - time_))
        seen[name] += 1
    result = json.loads((folder / "run" / "result.json").read_text())
    return Reference(result, tuple(marks), folder / "run")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Send ``kind`` ``delay`` s into ``mark`` (``SIGINT*2``: again ``gap`` s later)."""

    kind: str
    mark: Mark
    delay: float
    gap: float


def plan(ref: Reference, kind: str, rng: random.Random, phase: str | None = None) -> Plan:
    """A try of ``kind`` in ``phase`` (default: a random one, each equally likely), at one
    of its occurrences and a moment inside it."""
    phase = phase or rng.choice(sorted({mark.phase for mark in ref.marks}))
    mark = rng.choice([m for m in ref.marks if m.phase == phase])
    return Plan(kind, mark, rng.uniform(0.0, mark.seconds), rng.uniform(0.0, 0.3))


def run_try(ref: Reference, plan: Plan, folder: Path) -> Outcome:
    """Interrupt a run as ``plan`` says, then resume it; what went wrong, if anything."""
    kind, mark = plan.kind, plan.mark
    outcome = Outcome(kind, mark.phase, plan.delay)
    out, phases = folder / "run", folder / "phases"
    env = os.environ | {"JAXGEN_PHASES": str(phases)}
    argv = [*command(), *ARGS, "--out", str(out)]
    with open(folder / "stderr", "w+") as err:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                   start_new_session=True)  # fmt: skip
        _wait_for(mark, phases, process)
        time.sleep(plan.delay)
        _send(process, kind, plan.gap)
        try:
            outcome.status = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            outcome.problems.append(f"still running {TIMEOUT} s after {kind}")
            return outcome
        err.seek(0)
        stderr = err.read()
    early = not any(name == "import" for _, name in _phases(phases))  # before the launcher
    resume = [*argv[-len(ARGS) - 2 :], "--resume"]
    outcome.early = early
    outcome.problems += _judge(kind, outcome.status, stderr, resume, early=early)
    if outcome.status != 0:
        resumed = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True,
                                 timeout=TIMEOUT)  # fmt: skip
        outcome.resumed = True
        if resumed.returncode != 0 or "Traceback" in resumed.stderr:
            outcome.problems.append(
                f"--resume exited {resumed.returncode}: {resumed.stderr[-300:]}"
            )
            return outcome
        leftovers = [p.name for p in (out / "checkpoints").glob("*orbax-checkpoint-tmp*")]
        if leftovers:
            outcome.problems.append(f"left after --resume: {leftovers}")
    outcome.problems += _compare(ref.result, out / "result.json")
    return outcome


def _wait_for(mark: Mark, phases: Path, process: subprocess.Popen) -> None:
    """Return when the ``mark.occurrence``-th ``mark.phase`` line appears (``python``:
    at once, the process has just started)."""
    if mark.phase == "python":
        return
    while process.poll() is None:
        seen = [name for _, name in _phases(phases) if name == mark.phase]
        if len(seen) > mark.occurrence:
            return
        time.sleep(0.002)


def _send(process: subprocess.Popen, kind: str, gap: float) -> None:
    name = kind.removesuffix("*2")
    try:
        os.killpg(process.pid, signal.Signals[name])
        if kind.endswith("*2"):
            time.sleep(gap)
            os.killpg(process.pid, signal.Signals[name])
    except ProcessLookupError:  # it had already finished
        pass


def _judge(kind: str, status: int, stderr: str, resume: list[str], *, early: bool) -> list[str]:
    """The status and stderr against the documented ones (``resume``: the arguments of
    the command that resumes the run; ``early``: the signal came before the launcher
    ran, while Python was starting, and may end the process by its default action)."""
    problems = []
    if early:  # Python's own handling: killed by the signal, or a KeyboardInterrupt
        lines = stderr.strip().splitlines()  # raised in its startup code (status 1)
        if status in (-signal.Signals[kind.removesuffix("*2")], 1) and (
            not lines or lines[-1] == "KeyboardInterrupt"
        ):
            return problems
    if "Traceback" in stderr or "Exception ignored" in stderr:
        problems.append("traceback: " + stderr[-400:].replace("\n", " | "))
    if status == 0:
        return problems  # the run had finished; _compare checks its result
    if status != EXPECTED[kind]:
        problems.append(f"status {status}, expected {EXPECTED[kind]} (or 0 once complete)")
        return problems
    if status in LAST_LINE:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        line = re.fullmatch(LAST_LINE[status] + RESUME_HINT, last)
        if not line:
            problems.append(f"last line: {last!r}")
        elif "resume: " in last and shlex.split(last.split("resume: ")[1]) != ["jaxgen", *resume]:
            problems.append(f"the command to resume is not this run's: {last!r}")
    return problems


def _compare(expected: dict, path: Path) -> list[str]:
    if not path.is_file():
        return ["no result.json"]
    got = json.loads(path.read_text())
    keys = (set(expected) | set(got)) - TIMINGS
    differ = sorted(k for k in keys if json.dumps(got.get(k)) != json.dumps(expected.get(k)))
    return [f"result.json differs in {', '.join(differ)}"] if differ else []


def campaign(
    kinds, tries: int, seed: int, jobs: int, folder: Path, *, progress: bool = False
) -> list[Outcome]:
    """``tries`` tries of each signal in ``kinds``, ``jobs`` at a time (``progress``: a
    line on stderr per try)."""
    ref = reference(folder / "reference")
    rng = random.Random(seed)
    plans = [plan(ref, kind, rng) for kind in kinds for _ in range(tries)]
    done = collections.Counter()

    def one(plan: Plan) -> Outcome:
        outcome = run_in(folder, ref, plan)
        done["tries"] += 1
        if progress:
            line = f"{plan.kind} in {plan.mark.phase}: status {outcome.status}, {outcome.label}"
            print(f"[{done['tries']}/{len(plans)}] {line}", file=sys.stderr, flush=True)
        return outcome

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, plans))


def run_in(folder: Path, ref: Reference, plan: Plan) -> Outcome:
    """``run_try`` in a fresh folder under ``folder``, removed afterwards."""
    place = Path(tempfile.mkdtemp(dir=folder, prefix="try-"))
    try:
        return run_try(ref, plan, place)
    finally:
        shutil.rmtree(place, ignore_errors=True)


def table(outcomes: list[Outcome]) -> str:
    """Per signal: tries by phase and outcome, then the problems."""
    lines = []
    for kind in dict.fromkeys(o.signal for o in outcomes):
        mine = [o for o in outcomes if o.signal == kind]
        right = sum(not o.problems for o in mine)
        lines += [f"\n{kind}: {right} of {len(mine)} tries correct", ""]
        lines += ["| phase | tries | " + " | ".join(LABELS) + " |", "|---" * 6 + "|"]
        for phase in dict.fromkeys(o.phase for o in sorted(mine, key=_phase_order)):
            here = collections.Counter(o.label for o in mine if o.phase == phase)
            counts = [sum(here.values())] + [here[label] for label in LABELS]
            lines.append(f"| {phase} | " + " | ".join(map(str, counts)) + " |")
        for o in mine:
            for problem in o.problems:
                lines.append(f"- {o.phase} +{o.delay:.3f} s, status {o.status}: {problem}")
    return "\n".join(lines)


def _phase_order(outcome: Outcome) -> int:
    return PHASES.index(outcome.phase) if outcome.phase in PHASES else len(PHASES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=200, help="per signal (default 200)")
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="tries at a time (default 2)")
    args = parser.parse_args()
    # A shell starts background jobs with SIGINT ignored, and children inherit that;
    # a handler here makes theirs the default again, as in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jaxgen-faults-") as folder:
        kinds = args.signals.split(",")
        outcomes = campaign(kinds, args.tries, args.seed, args.jobs, Path(folder), progress=True)
    print(table(outcomes))
    print(f"\n{len(outcomes)} tries in {time.monotonic() - started:.0f} s")
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
