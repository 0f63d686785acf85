"""What the command line runs, one job per module.

config     TrainConfig: every setting of a run, validated once; presets
options    fields with help text and checks, and the CLI flags made from them
flags      the training commands' flags, --mesh and the multi-host start
methods    the training methods: hyper-parameters and hooks, the registry
task       a model as pure functions (per-example loss, or BatchNorm batch statistics)
augment    crop and flip on device, inside the step
step       TrainState, StepMetrics, the one training step, the evaluator
loop       run(config, out): the story of a run
placement  where a run's arrays live: one device, or a mesh of devices and processes
estimates  what a run measures besides training (Tr H, flatness, ‖H_z‖_F²)
instruments  curvature and gradient-noise instruments every few epochs (--instruments)
results    StepLogs → RunResult (every bound) → result.json, metrics.csv, steps.npz
checkpoint orbax checkpoints and resuming
interrupts SIGINT and SIGTERM read at safe points; the phases of a run, for fault tests
callbacks  progress bar and other hooks into a running loop
rng        the run's random streams, derived by name from its seed
sweep compare demo   runs of many runs (Figure 1; method tables; the demo report)
paper      the paper's table numbers that compare prints beside ours
errors     the kinds of failure the command line turns into one line
data models report   datasets, the paper's models, files and figures
"""
