"""What the command line runs, one job per module.

config     TrainConfig: every setting of a run, validated once; presets
options    fields with help text and checks, and the CLI flags made from them
methods    the training methods: hyper-parameters and hooks, the registry
step       TrainState, StepMetrics, the one training step, the evaluator
loop       run(config, out): the story of a run
estimates  what a run measures besides training (Tr H, flatness, ‖H_z‖_F²)
results    StepLogs → RunResult (every bound) → result.json, metrics.csv, steps.npz
checkpoint orbax checkpoints and resuming
callbacks  progress bar and other hooks into a running loop
rng        the run's random streams, derived by name from its seed
sweep demo runs of many runs (Figure 1; the demo report)
data models report   datasets, the paper's models, files and figures
"""
