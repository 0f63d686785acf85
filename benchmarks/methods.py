"""Time per training step of every method, relative to ERM, on VGG16 and PreActResNet18.

    python benchmarks/methods.py [--quick] [--width W] [--batch B] [--models vgg16,...]
                                 [--methods erm,gmp,...]

Each step is the one ``jaxgen train`` runs (``experiments.step.make_train_step``: batch
statistics, SGD with Nesterov momentum and weight decay, the method's hooks), jitted
once per method and timed on the same synthetic CIFAR-shaped batch (32×32×3, 10
classes) in one process, in interleaved blocks after warm-up. GMP runs in its default
mode (``"auto"``: the faster one for the backend) and, in rows of their own,
sequentially. Prints a table (ms per step, × ERM, images per second) and writes
``benchmarks/results/methods.json``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from _common import interleaved_medians, machine, save

from jaxgen.experiments import methods, models, task
from jaxgen.experiments.step import TrainState, make_train_step

MODELS = "vgg16,preactresnet18"
METHODS = [
    ("erm", {}),
    ("dropout", {}),
    ("label-smoothing", {}),
    ("flooding", {}),
    ("mixup", {}),
    ("adversarial", {}),
    ("dgc", {"start_epoch": 0}),
    ("sam", {}),
    ("amp", {}),
    ("gmp", {}),
    ("gmp", {"samples": 10}),
    ("gmp", {"mode": "sequential"}),
    ("gmp", {"samples": 10, "mode": "sequential"}),
]


def _step(model_name: str, name: str, fields: dict, width: int, batch_size: int):
    method = methods.make(name, **fields)
    model = models.build(model_name, (32, 32, 3), 10, width, dropout=method.model_dropout)
    pure = task.trainable(model_name, model)
    optimizer = methods.optimizer(
        method, [0.1], momentum=0.9, nesterov=True, weight_decay=1e-4,
        key=jax.random.key(0), steps_per_epoch=1,
    )  # fmt: skip
    step = jax.jit(make_train_step(pure, optimizer, method, num_classes=10))
    state = TrainState(jnp.zeros((), jnp.int32), pure.params, optimizer.init(pure.params),
                       jax.random.key(1), pure.model_state)  # fmt: skip
    keys = jax.random.split(jax.random.key(2))
    batch = {
        "x": jax.random.uniform(keys[0], (batch_size, 32, 32, 3)),
        "y": jax.random.randint(keys[1], (batch_size,), 0, 10),
    }
    return step, (state, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--width", type=int, default=64, help="base channels (paper: 64)")
    parser.add_argument("--batch", type=int, default=50, help="batch size (paper: 50)")
    parser.add_argument("--models", default=MODELS, help="comma-separated")
    parser.add_argument("--methods", help="comma-separated subset (default: all; erm always)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    header = f"{'model':<16}{'method':<32}{'ms/step':>10}{'× ERM':>8}{'images/s':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    chosen = None if args.methods is None else {"erm", *args.methods.split(",")}
    for model_name in args.models.split(","):
        calls = {}
        for name, fields in METHODS:
            if chosen is not None and name not in chosen:
                continue
            label = name + "".join(f" {k}={v}" for k, v in fields.items())
            calls[label] = _step(model_name, name, fields, args.width, args.batch)
        # A CPU step takes seconds: one call per block; a GPU step milliseconds.
        block_time = 0.0 if jax.default_backend() == "cpu" else 0.2
        medians = interleaved_medians(calls, repeats=2 if args.quick else 3, block_time=block_time)
        for label, seconds in medians.items():
            ratio = seconds / medians["erm"]
            rows.append({"model": model_name, "method": label, "ms": 1e3 * seconds,
                         "ratio": ratio, "images_per_second": args.batch / seconds})  # fmt: skip
            print(f"{model_name:<16}{label:<32}{1e3 * seconds:>10.1f}{ratio:>8.2f}"
                  f"{args.batch / seconds:>10.0f}")  # fmt: skip
    suffix = "" if args.models == MODELS else "-" + args.models.replace(",", "-")
    suffix += "" if args.methods is None else "-" + args.methods.replace(",", "-")
    print(f"wrote {save('methods' + suffix, rows)}")


if __name__ == "__main__":
    main()
