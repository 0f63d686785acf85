"""Meshes: the same numbers on 1, 4 or 8 simulated devices, and across two processes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss
from jax.sharding import NamedSharding, PartitionSpec

import jaxgen
from jaxgen import cli
from jaxgen._sharding import count_collectives, to_host
from jaxgen.experiments import loop, methods
from jaxgen.experiments.callbacks import Callback
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.step import TrainState, make_train_step

CONFIG = TrainConfig(
    width=16, epochs=2, batch_size=24, lr=0.1, num_train=72, hessian_probes=8,
    flatness_samples=4, checkpoint_every=2,
)  # fmt: skip


def _batch(size=16, key=0):
    kx, ky = jax.random.split(jax.random.key(key))
    return {"x": jax.random.normal(kx, (size, 6)), "y": jax.random.randint(ky, (size,), 0, 3)}


def _params():
    from conftest import mlp_init

    return mlp_init(jax.random.key(3))


def test_mesh_specs_and_bad_meshes():
    mesh = jaxgen.make_mesh("data=4,perturb=2")
    assert mesh.axis_names == ("data", "perturb") and mesh.devices.shape == (4, 2)
    assert jaxgen.make_mesh().shape["data"] == jax.device_count()
    with pytest.raises(ValueError, match="needs 16 devices, but there are 8"):
        jaxgen.make_mesh("data=16")
    with pytest.raises(ValueError, match="mesh axis must be one of data, perturb, got 'model'"):
        jaxgen.make_mesh("model=2")
    with pytest.raises(ValueError, match="mesh must look like data=8"):
        jaxgen.make_mesh("data=eight")
    with pytest.raises(ValueError, match="cannot be split evenly over data=8"):
        jaxgen.shard_batch(_batch(12), jaxgen.make_mesh("data=8"))


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_sharded_dispersion_equals_one_device_and_gathers_nothing_per_example(method):
    mesh = jaxgen.make_mesh("data=8")
    params, batch = _params(), _batch()
    reference = jaxgen.gradient_dispersion(mlp_loss, params, batch, method=method)
    sharded_batch = jaxgen.shard_batch(batch, mesh)
    sharded_params = jaxgen.replicate(params, mesh)
    stats = jaxgen.gradient_dispersion(mlp_loss, sharded_params, sharded_batch, method=method)
    chex.assert_trees_all_close(stats, reference, rtol=1e-5, atol=1e-7)
    assert stats.sq_norms.sharding.spec == PartitionSpec("data")  # norms stay on their shard
    text = (
        jax.jit(lambda p, b: jaxgen.gradient_dispersion(mlp_loss, p, b, method=method))
        .lower(sharded_params, sharded_batch)
        .compile()
        .as_text()
    )
    assert "all-gather" not in text and "all-to-all" not in text


def test_sharded_convolution_in_example_chunks_gathers_nothing(monkeypatch):
    # A big batch's per-example kernel gradients are formed a chunk at a time
    # (rules.in_example_chunks): example i·count + j in iteration j, so each device keeps
    # its own examples. Forced here: 32 examples in 4 iterations of 8 (one per device).
    from conftest import cnn_init, cnn_loss

    from jaxgen._ghost import rules

    mesh = jaxgen.make_mesh("data=8")
    params = cnn_init(jax.random.key(2))
    kx, ky = jax.random.split(jax.random.key(4))
    batch = {"x": jax.random.normal(kx, (32, 8)), "y": jax.random.randint(ky, (32,), 0, 3)}
    reference = jaxgen.gradient_dispersion(cnn_loss, params, batch, method="ghost")  # one pass
    monkeypatch.setattr(rules, "CONV_CACHED_ELEMENTS", 0)
    # one example: its padded input (10) and output gradient (8 × 4): chunks of 8
    monkeypatch.setattr(rules, "CONV_CHUNK_ELEMENTS", 8 * (10 + 8 * 4))
    sharded = (jaxgen.replicate(params, mesh), jaxgen.shard_batch(batch, mesh))
    stats = jaxgen.gradient_dispersion(cnn_loss, *sharded, method="ghost")
    chex.assert_trees_all_close(stats, reference, rtol=1e-5, atol=1e-7)
    lowered = jax.jit(lambda p, b: jaxgen.gradient_dispersion(cnn_loss, p, b, method="ghost"))
    assert " scan[" in str(jax.make_jaxpr(lowered)(*sharded))
    text = lowered.lower(*sharded).compile().as_text()
    assert "all-gather" not in text and "all-to-all" not in text


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_hessian_trace_probes_spread_over_devices_give_the_same_estimate(method):
    mesh = jaxgen.make_mesh("data=8")
    params, batch = _params(), _batch()
    key = jax.random.key(5)
    plain = jaxgen.hessian_trace(
        mlp_loss, params, batch, key=key, num_probes=21, chunk_size=3, method=method
    )
    spread = jaxgen.hessian_trace(  # rows of 8 probes (3 rounded up), the last one padded
        mlp_loss,
        jaxgen.replicate(params, mesh),
        batch,
        key=key,
        num_probes=21,
        chunk_size=3,
        method=method,
        probe_sharding=NamedSharding(mesh, PartitionSpec("data")),
    )
    np.testing.assert_allclose(spread.value, plain.value, rtol=1e-5)
    np.testing.assert_allclose(spread.stderr, plain.stderr, rtol=1e-4)


def _step_and_state(mesh, track_every, method=None):
    method = method or methods.ERM()
    params, batch = _params(), _batch()
    optimizer = methods.optimizer(
        method, [0.1], key=jax.random.key(0), steps_per_epoch=1, mesh=mesh
    )
    step = make_train_step(mlp_loss, optimizer, method, track_every=track_every)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.random.key(1))
    if mesh is not None:
        state, batch = jaxgen.replicate(state, mesh), jaxgen.shard_batch(batch, mesh)
    return jax.jit(step), state, batch


def test_the_sharded_training_step_equals_one_device_and_tracking_adds_few_all_reduces():
    mesh = jaxgen.make_mesh("data=8")
    step, state, batch = _step_and_state(None, 1)
    reference, ref_metrics = step(state, batch)
    step, state, batch = _step_and_state(mesh, 1)
    sharded, metrics = step(state, batch)
    chex.assert_trees_all_close(sharded.params, reference.params, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5, atol=1e-7)

    text = step.lower(state, batch).compile().as_text()
    tracked = count_collectives(text)["all-reduce"]
    plain = _plain_all_reduces(mesh)
    assert tracked <= plain + 2, (tracked, plain)


def test_gmp_spreads_its_perturbed_passes_over_perturb_with_the_same_draws():
    gmp = methods.GMP(samples=4, sigma=0.05)
    step, state, batch = _step_and_state(None, 1, gmp)
    reference, ref_metrics = step(state, batch)
    mesh = jaxgen.make_mesh("data=2,perturb=4")
    step, state, batch = _step_and_state(mesh, 1, gmp)
    sharded, metrics = step(state, batch)
    chex.assert_trees_all_close(sharded.params, reference.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5, atol=1e-6)


def _plain_all_reduces(mesh):
    params, batch = jaxgen.replicate(_params(), mesh), jaxgen.shard_batch(_batch(), mesh)
    optimizer = optax.sgd(0.1)

    @jax.jit
    def plain(params, opt_state, batch):
        loss, grad = jax.value_and_grad(
            lambda p: jnp.mean(jax.vmap(mlp_loss, (None, 0))(p, batch))
        )(params)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    text = plain.lower(params, optimizer.init(params), batch).compile().as_text()
    return count_collectives(text)["all-reduce"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return loop.run(CONFIG, out), out


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight")
    return loop.run(CONFIG, out, mesh=jaxgen.make_mesh("data=8")), out


class _Stop(Exception):
    pass


class _StopAfterFirstEpoch(Callback):
    def on_epoch(self, row):
        raise _Stop


def test_a_run_on_a_mesh_equals_one_device_and_resumes_on_another_device_count(
    one_device, tmp_path
):
    reference, _ = one_device
    with pytest.raises(_Stop):
        loop.run(
            CONFIG, tmp_path, mesh=jaxgen.make_mesh("data=8"), callbacks=[_StopAfterFirstEpoch()]
        )
    resumed = loop.run(CONFIG, tmp_path, resume=True, mesh=jaxgen.make_mesh("data=4,perturb=2"))
    for field in ("train_loss", "test_loss", "sum_lr2_variance", "eq2_bound", "best_test_accuracy"):
        np.testing.assert_allclose(getattr(resumed, field), getattr(reference, field), rtol=1e-4)


def test_cli_mesh_writes_the_same_bounds_and_refuses_bad_meshes(one_device, tmp_path, capsys):
    reference, _ = one_device
    argv = ["bound", "--width", "16", "--epochs", "2", "--batch-size", "24", "--lr", "0.1",
            "--num-train", "72", "--hessian-probes", "8", "--flatness-samples", "4",
            "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    assert cli.main([*argv, "--mesh", "data=8", "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    for key in ("eq2_bound", "theorem1_bound", "sum_lr2_variance", "test_loss"):
        np.testing.assert_allclose(result[key], getattr(reference, key), rtol=1e-4)
    capsys.readouterr()
    for mesh, message in [
        ("data=16", "--mesh: data=16 needs 16 devices, but there are 8"),
        ("data=5", "cannot be split evenly over data=5"),
        ("model=2", "--mesh: axis must be one of data, perturb, got 'model'"),
    ]:
        assert cli.main([*argv, "--mesh", mesh, "--out", str(tmp_path / mesh)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_on_eight_devices(eight_devices, one_device, tmp_path):
    _, eight_out = eight_devices
    _, one_out = one_device
    worker = Path(__file__).parent / "multihost_worker.py"
    port = _free_port()
    config = json.dumps(CONFIG.as_dict())
    processes = [
        subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(tmp_path), config],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)
    ]  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    params = [np.load(tmp_path / f"params-{i}.npy") for i in (0, 1)]
    np.testing.assert_array_equal(params[0], params[1])
    assert [int(np.load(tmp_path / f"stopped-{i}.npy")) for i in (0, 1)] == [143, 143]
    result = json.loads((tmp_path / "result.json").read_text())
    eight = json.loads((eight_out / "result.json").read_text())
    one = json.loads((one_out / "result.json").read_text())
    for key in ("train_loss", "test_loss", "sum_lr2_variance", "eq2_bound", "neu2021_bound"):
        np.testing.assert_allclose(result[key], eight[key], rtol=1e-5)
        np.testing.assert_allclose(result[key], one[key], rtol=1e-4)
    assert result["num_steps"] == one["num_steps"] == 6

    class KeepParams(Callback):  # the two processes' checkpoint, read by one on 8 devices
        def on_trained(self, state):
            leaves = jax.tree_util.tree_leaves(state.params)
            self.flat = np.concatenate([to_host(leaf).ravel() for leaf in leaves])

    keep = KeepParams()
    resumed = loop.run(
        CONFIG, tmp_path, resume=True, mesh=jaxgen.make_mesh("data=4,perturb=2"), callbacks=[keep]
    )
    np.testing.assert_array_equal(keep.flat, params[0])
    np.testing.assert_allclose(resumed.eq2_bound, result["eq2_bound"], rtol=1e-5)


def test_collectives_are_counted_as_instructions_on_the_path_every_run_takes():
    text = """HloModule step

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %sum = f32[] add(%x, %y)
}

%rare_branch (p: f32[8]) -> f32[8] {
  ROOT %all-reduce.3 = f32[8]{0} all-reduce(%p), to_apply=%add
}

%common_branch (p: f32[8]) -> f32[8] {
  ROOT %copy = f32[8]{0} copy(%p)
}

ENTRY %main (a: f32[8], b: f32[8], c: f32[4], k: pred[]) -> f32[8] {
  %all-reduce.11 = (f32[8]{0}, /*index=5*/f32[8]{0}) all-reduce(%a, %b), to_apply=%add
  %get-tuple-element.19 = f32[8]{0} get-tuple-element(%all-reduce.11), index=0
  %all-gather-start = (f32[4]{0}, f32[8]{0}) all-gather-start(%c), dimensions={0}
  %all-gather-done = f32[8]{0} all-gather-done(%all-gather-start)
  ROOT %conditional = f32[8]{0} conditional(%k, %a, %b), true_computation=%rare_branch,
    false_computation=%common_branch
}
"""
    counts = count_collectives(text)
    assert counts["all-reduce"] == 1 and counts["all-gather"] == 1 and counts["all-to-all"] == 0
    assert count_collectives(text, in_branches=True)["all-reduce"] == 2


def test_to_host_reads_replicated_and_sharded_arrays():
    mesh = jaxgen.make_mesh("data=8")
    x = jnp.arange(16.0)
    np.testing.assert_array_equal(to_host(jaxgen.shard_batch(x, mesh)), np.arange(16.0))
    np.testing.assert_array_equal(to_host(jaxgen.replicate(x, mesh)), np.arange(16.0))
