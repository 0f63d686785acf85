"""Timing and memory helpers shared by the benchmarks, and their two models."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).parent / "results"


def median_seconds(
    fn: Callable[..., Any], *args: Any, repeats: int = 7, warmup: int = 2, min_time: float = 0.5
) -> float:
    """Median wall time of ``fn(*args)`` after ``warmup`` calls, each result blocked on.

    Runs at least ``repeats`` times and, for fast functions, keeps going until
    ``min_time`` seconds have been measured (at most 200 runs): on a shared 2-core
    machine a median of 7 millisecond-scale runs moves by ±20 %.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 200):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_call_seconds(calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]) -> dict:
    """Wall time of each ``fn(*args)``'s first call, blocked on: its tracing and
    compilation, plus one run (on a GPU, compilation includes XLA's autotuning)."""
    seconds = {}
    for name, (fn, args) in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds[name] = time.perf_counter() - start
    return seconds


def interleaved_medians(
    calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]],
    *,
    repeats: int = 5,
    block_time: float = 0.1,
) -> dict[str, float]:
    """Median wall time of each ``fn(*args)``, measured in interleaved blocks.

    Each of ``repeats`` rounds visits every function once: one untimed call (so caches
    hold its own data, not the previous function's), then a block of timed calls lasting
    about ``block_time`` seconds. A function's time is the median over its blocks'
    medians, so slow load changes on a shared machine fall on all functions alike.
    """
    per_call = {}
    for name, (fn, args) in calls.items():
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        per_call[name] = time.perf_counter() - start
    blocks: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            jax.block_until_ready(fn(*args))
            times = []
            for _ in range(max(1, min(100, int(block_time / max(per_call[name], 1e-6))))):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times.append(time.perf_counter() - start)
            blocks[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in blocks.items()}


def peak_bytes(jitted: Any, *args: Any) -> int:
    """XLA's compiled memory estimate: arguments + outputs + temporaries − aliased."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def machine() -> str:
    device = jax.devices()[0]
    return f"{platform.machine()} {device.platform} ({device.device_kind}), jax {jax.__version__}"


def save(name: str, rows: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    return path


def cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    return -jax.nn.log_softmax(logits)[label]


def gaussian_batch(shape: tuple[int, ...], classes: int):
    """``make_batch(key, size)``: ``size`` standard normal inputs of ``shape`` and labels
    uniform in ``0..classes-1``."""

    def make_batch(key, size):
        kx, ky = jax.random.split(key)
        return {
            "x": jax.random.normal(kx, (size, *shape)),
            "y": jax.random.randint(ky, (size,), 0, classes),
        }

    return make_batch


def mlp(key: jax.Array, sizes=(784, 1024, 1024, 10)):
    """The MLP 784-1024-1024-10 of the performance targets: (params, loss_fn, make_batch)."""
    keys = jax.random.split(key, len(sizes))
    params = [
        {"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]

    def loss_fn(params, example):
        x = example["x"]
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return cross_entropy(x @ params[-1]["w"] + params[-1]["b"], example["y"])

    return params, loss_fn, gaussian_batch((sizes[0],), sizes[-1])


def cnn(key: jax.Array):
    """A small CIFAR-shaped CNN: conv3x3(16)-pool-conv3x3(32)-pool-dense(10)."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "conv1": jax.random.normal(k1, (3, 3, 3, 16)) / jnp.sqrt(27.0),
        "b1": jnp.zeros(16),
        "conv2": jax.random.normal(k2, (3, 3, 16, 32)) / jnp.sqrt(144.0),
        "b2": jnp.zeros(32),
        "dense": jax.random.normal(k3, (8 * 8 * 32, 10)) / jnp.sqrt(2048.0),
        "b3": jnp.zeros(10),
    }

    def conv(x, w, b):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(y + b)

    def pool(x):
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    def loss_fn(params, example):
        x = example["x"][None]
        x = pool(conv(x, params["conv1"], params["b1"]))
        x = pool(conv(x, params["conv2"], params["b2"]))
        return cross_entropy(x.reshape(-1) @ params["dense"] + params["b3"], example["y"])

    return params, loss_fn, gaussian_batch((32, 32, 3), 10)


def strided_cnn(key: jax.Array):
    """conv3x3(32, stride 2)-depthwise conv3x3(×2, stride 2)-conv1x1(64)-dense(10), 32×32×3."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "conv1": jax.random.normal(k1, (3, 3, 3, 32)) / jnp.sqrt(27.0),
        "depthwise": jax.random.normal(k2, (3, 3, 1, 64)) / 3.0,
        "pointwise": jax.random.normal(k3, (1, 1, 64, 64)) / 8.0,
        "dense": jax.random.normal(k4, (8 * 8 * 64, 10)) / jnp.sqrt(4096.0),
        "b": jnp.zeros(10),
    }

    def conv(x, w, stride, groups=1):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )  # fmt: skip

    def loss_fn(params, example):
        x = jax.nn.relu(conv(example["x"][None], params["conv1"], 2))
        x = jax.nn.relu(conv(x, params["depthwise"], 2, groups=32))
        x = jax.nn.relu(conv(x, params["pointwise"], 1))
        return cross_entropy(x.reshape(-1) @ params["dense"] + params["b"], example["y"])

    _, _, make_batch = cnn(key)
    return params, loss_fn, make_batch


def wide_cnn(key: jax.Array, width=64):
    """conv3x3(64)-conv3x3(64)-pool-dense(10) at 32×32×3: VGG's first block, whose
    per-example kernel gradients ``in_example_chunks`` forms a few examples at a time."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "conv1": jax.random.normal(k1, (3, 3, 3, width)) / jnp.sqrt(27.0),
        "conv2": jax.random.normal(k2, (3, 3, width, width)) / jnp.sqrt(9.0 * width),
        "dense": jax.random.normal(k3, (16 * 16 * width, 10)) / jnp.sqrt(256.0 * width),
    }

    def conv(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(y)

    def loss_fn(params, example):
        x = conv(conv(example["x"][None], params["conv1"]), params["conv2"])
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        return cross_entropy(x.reshape(-1) @ params["dense"], example["y"])

    return params, loss_fn, gaussian_batch((32, 32, 3), 10)


def checkpointed_mlp(key: jax.Array):
    """``mlp`` with each hidden layer under ``jax.checkpoint``."""
    params, _, make_batch = mlp(key)

    @jax.checkpoint
    def layer(w, b, x):
        return jax.nn.relu(x @ w + b)

    def loss_fn(params, example):
        x = example["x"]
        for p in params[:-1]:
            x = layer(p["w"], p["b"], x)
        return cross_entropy(x @ params[-1]["w"] + params[-1]["b"], example["y"])

    return params, loss_fn, make_batch


def scanned_stack(key: jax.Array, layers=4, width=128, length=16, classes=10):
    """``layers`` residual tanh blocks on a sequence, written as ``lax.scan`` over stacked
    weights (the way flax ``nn.scan`` and equinox stacks write them)."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "stack": jax.random.normal(k1, (layers, width, width)) / jnp.sqrt(width),
        "head": jax.random.normal(k2, (width, classes)) / jnp.sqrt(width),
    }

    def loss_fn(params, example):
        def block(h, w):
            return h + jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(block, example["x"], params["stack"])
        return cross_entropy(h.mean(0) @ params["head"], example["y"])

    return params, loss_fn, gaussian_batch((length, width), classes)


def mean_loss(loss_fn):
    def batch_loss(params, batch):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))

    return batch_loss


def transformer(key: jax.Array, vocab=1000, width=128, length=32, classes=10):
    """One pre-LayerNorm transformer block (single-head attention, 4x MLP) on tokens."""
    keys = jax.random.split(key, 7)

    def dense(k, a, b):
        return jax.random.normal(k, (a, b)) / jnp.sqrt(a)

    params = {
        "embed": jax.random.normal(keys[0], (vocab, width)) * 0.02,
        "qkv": dense(keys[1], width, 3 * width),
        "out": dense(keys[2], width, width),
        "up": dense(keys[3], width, 4 * width),
        "down": dense(keys[4], 4 * width, width),
        "head": dense(keys[5], width, classes),
        "ln1": jnp.ones(width),
        "ln2": jnp.ones(width),
        "b_up": jnp.zeros(4 * width),
    }

    def layer_norm(x, gain):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * gain

    def loss_fn(params, example):
        h = params["embed"][example["x"]]
        q, k, v = jnp.split(layer_norm(h, params["ln1"]) @ params["qkv"], 3, axis=-1)
        attention = jax.nn.softmax(q @ k.T / jnp.sqrt(q.shape[-1]), axis=-1)
        h = h + (attention @ v) @ params["out"]
        up = jax.nn.gelu(layer_norm(h, params["ln2"]) @ params["up"] + params["b_up"])
        h = h + up @ params["down"]
        return cross_entropy(h.mean(0) @ params["head"], example["y"])

    def make_batch(key, size):
        kx, ky = jax.random.split(key)
        return {
            "x": jax.random.randint(kx, (size, length), 0, vocab),
            "y": jax.random.randint(ky, (size,), 0, classes),
        }

    return params, loss_fn, make_batch


def scanned_transformer(key: jax.Array, layers=4, vocab=1000, width=128, length=32, classes=10):
    """``layers`` pre-LayerNorm transformer blocks (the block of ``transformer``, with
    biases) written as one ``lax.scan`` over stacked weights, after an embedding."""
    keys = jax.random.split(key, 7)

    def dense(k, a, b):
        return jax.random.normal(k, (layers, a, b)) / jnp.sqrt(a)

    params = {
        "embed": jax.random.normal(keys[0], (vocab, width)) * 0.02,
        "head": jax.random.normal(keys[5], (width, classes)) / jnp.sqrt(width),
        "blocks": {
            "qkv": dense(keys[1], width, 3 * width),
            "out": dense(keys[2], width, width),
            "up": dense(keys[3], width, 4 * width),
            "down": dense(keys[4], 4 * width, width),
            "ln1": jnp.ones((layers, width)),
            "ln2": jnp.ones((layers, width)),
            "b_up": jnp.zeros((layers, 4 * width)),
            "b_down": jnp.zeros((layers, width)),
        },
    }

    def layer_norm(x, gain):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * gain

    def block(h, p):
        q, k, v = jnp.split(layer_norm(h, p["ln1"]) @ p["qkv"], 3, axis=-1)
        attention = jax.nn.softmax(q @ k.T / jnp.sqrt(q.shape[-1]), axis=-1)
        h = h + (attention @ v) @ p["out"]
        up = jax.nn.gelu(layer_norm(h, p["ln2"]) @ p["up"] + p["b_up"])
        return h + up @ p["down"] + p["b_down"], None

    def loss_fn(params, example):
        h, _ = jax.lax.scan(block, params["embed"][example["x"]], params["blocks"])
        return cross_entropy(h.mean(0) @ params["head"], example["y"])

    _, _, make_batch = transformer(key, vocab, width, length, classes)
    return params, loss_fn, make_batch


def recurrent(key: jax.Array, width=128, length=32, classes=10):
    """An Elman RNN, ``h_{t+1} = tanh(h_t W_h + x_t W_x + b)`` over ``length`` steps,
    written as ``lax.scan`` closing over its weights (the same cell at every step)."""
    keys = jax.random.split(key, 3)
    params = {
        "wh": jax.random.normal(keys[0], (width, width)) / jnp.sqrt(width),
        "wx": jax.random.normal(keys[1], (width, width)) / jnp.sqrt(width),
        "b": jnp.zeros(width),
        "head": jax.random.normal(keys[2], (width, classes)) / jnp.sqrt(width),
    }

    def loss_fn(params, example):
        def step(h, x):
            return jnp.tanh(h @ params["wh"] + x @ params["wx"] + params["b"]), None

        h, _ = jax.lax.scan(step, jnp.zeros(width), example["x"])
        return cross_entropy(h @ params["head"], example["y"])

    return params, loss_fn, gaussian_batch((length, width), classes)


def torch_device() -> str:
    """Where the PyTorch peers run: ``"cuda"`` when JAX runs on a GPU and PyTorch sees
    one (both frameworks on the same chip), else ``"cpu"`` with 2 threads."""
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(2)
    return "cpu"


def torch_on_device(model: Any, shape: tuple[int, ...], size: int):
    """``(model, x, y, device)``: ``model`` moved to ``torch_device()`` and a random batch
    of ``size`` inputs of ``shape`` and labels in 0..9 drawn there."""
    import torch

    device = torch_device()
    x = torch.randn(size, *shape, device=device)
    return model.to(device), x, torch.randint(0, 10, (size,), device=device), device


def torch_timed(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by ``torch.cuda.synchronize()`` on a GPU, so that a timed call
    covers the kernels it queued (``jax.block_until_ready`` cannot see them)."""
    if device != "cuda":
        return fn
    import torch

    def synchronized():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synchronized


def torch_model(name: str):
    """The PyTorch twin of ``mlp`` or ``cnn`` (same layers) and its input shape, or
    ``(None, None)`` for models without one."""
    import torch

    nn = torch.nn
    if name.startswith("MLP 784-1024-1024-10"):
        layers = [nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU()]
        return nn.Sequential(nn.Flatten(), *layers, nn.Linear(1024, 10)), (784,)
    if name.startswith("CNN"):
        layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
        layers += [nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 32, 10)), (3, 32, 32)
    return None, None


def torch_twin(name, params, batch):
    """``(model, x, y)``: the PyTorch twin of ``name`` holding ``params`` and ``batch``
    (layouts converted: Linear weights transposed, HWIO kernels to OIHW, NHWC inputs to
    NCHW, the dense layer's rows reordered from JAX's HWC flattening to PyTorch's CHW)."""
    import torch

    model, shape = torch_model(name)
    if model is None:
        return None
    size = batch["y"].shape[0]
    model, _, _, device = torch_on_device(model, shape, size)

    def tensor(a):
        return torch.tensor(np.asarray(a), device=device)

    with torch.no_grad():
        if name.startswith("MLP"):
            linears = [m for m in model if isinstance(m, torch.nn.Linear)]
            for layer, p in zip(linears, params, strict=True):
                layer.weight.copy_(tensor(p["w"]).T)
                layer.bias.copy_(tensor(p["b"]))
            x = tensor(batch["x"])
        else:
            conv1, conv2, dense = (m for m in model if hasattr(m, "weight"))
            conv1.weight.copy_(tensor(params["conv1"]).permute(3, 2, 0, 1))
            conv1.bias.copy_(tensor(params["b1"]))
            conv2.weight.copy_(tensor(params["conv2"]).permute(3, 2, 0, 1))
            conv2.bias.copy_(tensor(params["b2"]))
            rows = np.asarray(params["dense"]).reshape(8, 8, 32, 10).transpose(2, 0, 1, 3)
            dense.weight.copy_(tensor(rows.reshape(2048, 10)).T)
            dense.bias.copy_(tensor(params["b3"]))
            x = tensor(batch["x"]).permute(0, 3, 1, 2).contiguous()
    return model, x, tensor(batch["y"]).long(), device


def as_jax_layout(name, grads: dict):
    """PyTorch's gradients (``named_parameters`` order) in the layout of ``params``."""
    g = [t.detach().cpu().numpy() for t in grads]
    if name.startswith("MLP"):
        return [{"w": w.T, "b": b} for w, b in zip(g[::2], g[1::2], strict=True)]
    dense = g[4].T.reshape(32, 8, 8, 10).transpose(1, 2, 0, 3).reshape(2048, 10)
    return {
        "conv1": g[0].transpose(2, 3, 1, 0),
        "b1": g[1],
        "conv2": g[2].transpose(2, 3, 1, 0),
        "b2": g[3],
        "dense": dense,
        "b3": g[5],
    }


def torch_transformer_twin(params, batch):
    """``(model, x, y, device)``: the block of ``transformer`` in PyTorch, holding ``params``
    (its weights are ``x @ W``, as in JAX: no transposes) and ``batch``. For PyHessian,
    which needs only a module and a loss; BackPACK and Opacus do not cover attention."""
    import torch

    device = torch_device()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in params.items():
                tensor = torch.tensor(np.asarray(value), device=device)
                self.register_parameter(name, torch.nn.Parameter(tensor))

        @staticmethod
        def layer_norm(x, gain):
            mean = x.mean(-1, keepdim=True)
            return (x - mean) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * gain

        def forward(self, tokens):
            h = self.embed[tokens]
            q, k, v = (self.layer_norm(h, self.ln1) @ self.qkv).chunk(3, dim=-1)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            h = h + (torch.softmax(scores, dim=-1) @ v) @ self.out
            up = torch.nn.functional.gelu(
                self.layer_norm(h, self.ln2) @ self.up + self.b_up, approximate="tanh"
            )
            h = h + up @ self.down
            return h.mean(1) @ self.head

    x = torch.tensor(np.asarray(batch["x"]), device=device).long()
    return Block(), x, torch.tensor(np.asarray(batch["y"]), device=device).long(), device
