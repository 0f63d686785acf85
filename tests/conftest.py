"""Shared tiny models. Eight simulated CPU devices for the multi-device tests.

Compiled programs and the generated MNIST-1D are cached on disk for the session
(subprocesses, notebook kernels and the pytest-xdist workers inherit the folders): many
tests train the same tiny configurations, and compiling them again dominates the suite's
time on two cores.
"""

import gc
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)
# LLVM at -O0 (XLA's HLO passes, fusion, buffer assignment and collectives unchanged, so
# the compiled programs' structure and memory are those users get): compiling, not
# running, dominates these tiny tests, and it cuts the suite's time by about a third.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update("jax_disable_most_optimizations", True)
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # else a parent process's
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgen-jit-")
_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
# Every program, however quick to compile: a `jaxgen` subprocess compiles some fifty small
# ones (eager operations among them), and reading them back saves it about a second.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
_OWN_DATA = "JAXGEN_CACHE_DIR" not in os.environ  # generated MNIST-1D, shared the same way
if _OWN_DATA:
    os.environ["JAXGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgen-data-")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

collect_ignore = ["multihost_worker.py"]  # a script the two-process test launches

DOCS = Path(__file__).parent.parent / "docs"
SITE_TESTS = ("test_docs.py", "test_notebooks.py")  # the modules that read the built site
_BUILDS: list[tuple[subprocess.Popen, Path]] = []  # started by this process


def _start_site_build() -> Path:
    """Build the docs site in the background (``sphinx-build -W``, notebooks executed),
    into a fresh folder whose ``status`` file holds the exit code once it is done."""
    root = Path(tempfile.mkdtemp(prefix="jaxgen-site-"))
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html"]
    command += ["-d", str(root / "doctrees"), str(DOCS), str(root / "html")]
    script = f"{shlex.join(command)} > build.log 2>&1; echo $? > status.tmp && mv status.tmp status"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # notebooks draw inline
    build = subprocess.Popen(["sh", "-c", script], cwd=root, env=env, start_new_session=True)
    _BUILDS.append((build, root))
    return root


def pytest_configure(config):
    """Start the site's build before the tests, so that it runs beside them: one build
    per session, whichever xdist worker reads it (workers inherit the folder's name)."""
    if hasattr(config, "workerinput") or "JAXGEN_TEST_SITE" in os.environ:
        return
    tests = Path(__file__).parent.resolve()
    asked = [Path(str(arg).split("::")[0]).resolve() for arg in config.args] or [tests]
    if any(path in (tests, tests.parent) or path.name in SITE_TESTS for path in asked):
        os.environ["JAXGEN_TEST_SITE"] = str(_start_site_build())


def pytest_unconfigure(config):
    """A build outlives no session (one that ends early stops it), nor does its folder,
    nor the compilation or data cache this process made."""
    for build, root in _BUILDS:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGTERM)
            build.wait()
        shutil.rmtree(root, ignore_errors=True)
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
    if _OWN_DATA:
        shutil.rmtree(os.environ["JAXGEN_CACHE_DIR"], ignore_errors=True)


# The slowest tests (pytest --durations), started first so that the two xdist workers
# (--dist worksteal) finish together instead of one waiting on the other's last long test.
SLOW_FIRST = (
    "test_demo_quick_writes_the_report_and_can_run_again",
    "test_the_python_blocks_of_each_page_run_in_order",
    "test_a_signal_in_any_phase_ends_as_documented_and_resumes_to_the_same_result",
    "test_batchnorm_statistics_come_from_the_clean_pass_only",
    "test_two_processes_train_as_one_on_eight_devices",
    "test_a_run_on_a_mesh_equals_one_device_and_resumes_on_another_device_count",
    "test_same_configuration_same_result",
    "test_a_conv_model_on_a_mocked_tfds_dataset",
    "test_every_estimator_follows_scans_checkpoints_and_convolutions",
    "test_instruments_are_measured_on_their_subset_and_resume_to_the_same_numbers",
)


def pytest_collection_modifyitems(items):
    """The slowest tests first; the tests that read the site last, when its build has had
    the most time."""

    def order(item):
        if "site" in getattr(item, "fixturenames", ()):
            return 2
        return 0 if item.name.split("[")[0] in SLOW_FIRST else 1

    items.sort(key=order)


def _memory_maps() -> int:
    """How many memory mappings this process holds (Linux; 0 where it cannot tell)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


def _map_limit() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530  # Linux's default


_MAP_LIMIT = _map_limit()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after a module once they hold half the process's
    memory mappings.

    Every compiled XLA:CPU kernel keeps three mappings (code, constants, data) for as long
    as a cache holds its program; one xdist worker running half the suite reached 64,787
    of Linux's default 65,530, and a worker that crosses it aborts inside XLA's compiler
    (``Fatal Python error: Aborted`` in ``backend_compile_and_load``: its next ``mmap``
    fails). Programs shared within a module stay compiled; across modules the on-disk
    compilation cache serves them again.
    """
    yield
    if _memory_maps() > _MAP_LIMIT // 2:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def site():
    """The HTML site, built from a clean environment with warnings as errors."""
    root = os.environ.get("JAXGEN_TEST_SITE")
    root = Path(root) if root else _start_site_build()
    deadline = time.monotonic() + 900
    while not (root / "status").exists():
        assert time.monotonic() < deadline, "the docs build took over 15 minutes"
        time.sleep(0.5)
    log = (root / "build.log").read_text()
    assert (root / "status").read_text().strip() == "0", log[-5000:]
    return root / "html"


def mlp_init(key, sizes=(6, 5, 3)):
    params = []
    for k, (fan_in, fan_out) in zip(
        jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:], strict=True), strict=True
    ):
        params.append(
            {
                "w": jax.random.normal(k, (fan_in, fan_out)) / jnp.sqrt(fan_in),
                "b": 0.1 * jnp.ones(fan_out),
            }
        )
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(logits, label):
    return -jax.nn.log_softmax(logits)[label]


def mlp_loss(params, example):
    """Per-example cross-entropy of a tanh MLP."""
    return cross_entropy(mlp_apply(params, example["x"]), example["y"])


@jax.custom_vjp
def custom_vjp_tanh(x):
    """``tanh`` behind a ``jax.custom_vjp`` (forward mode cannot differentiate it), with
    the same derivatives: its backward pass divides by ``cosh²``."""
    return jnp.tanh(x)


custom_vjp_tanh.defvjp(lambda x: (custom_vjp_tanh(x), x), lambda x, g: (g / jnp.cosh(x) ** 2,))


def mlp_loss_custom_vjp(params, example):
    """``mlp_loss`` with its hidden ``tanh`` behind a ``custom_vjp``: the same function."""
    x = example["x"]
    for layer in params[:-1]:
        x = custom_vjp_tanh(x @ layer["w"] + layer["b"])
    return cross_entropy(x @ params[-1]["w"] + params[-1]["b"], example["y"])


def wide_relu_mlp():
    """``(loss_fn, params, batch, per_example_bytes)``: a ReLU MLP 64-256-256-10 and a
    batch of 64, whose per-example gradients (``b × P`` float32) take ``per_example_bytes``:
    large beside everything else, for the tests that no such buffer is formed."""
    sizes = (64, 256, 256, 10)
    keys = jax.random.split(jax.random.key(0), 3)
    params = [
        {"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss_fn(params, z):
        x = z["x"]
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return -jax.nn.log_softmax(x @ params[-1]["w"] + params[-1]["b"])[z["y"]]

    batch = {"x": jnp.ones((64, 64)), "y": jnp.zeros(64, jnp.int32)}
    per_example_bytes = 64 * sum(x.size for x in jax.tree_util.tree_leaves(params)) * 4
    return loss_fn, params, batch, per_example_bytes


def cnn_init(key):
    k1, k2 = jax.random.split(key)
    return {
        "conv": jax.random.normal(k1, (3, 1, 4)) / 3.0,  # (width, in, out), 1-D conv
        "dense": jax.random.normal(k2, (4 * 4, 3)) / 4.0,
    }


def cnn_loss(params, example):
    """Per-example cross-entropy of a 1-D CNN with average pooling."""
    x = example["x"][None, :, None]  # (N=1, length 8, channels 1)
    h = jax.lax.conv_general_dilated(
        x,
        params["conv"],
        window_strides=(1,),
        padding="SAME",
        dimension_numbers=("NWC", "WIO", "NWC"),
    )
    h = jax.nn.relu(h).reshape(1, 4, 2, 4).mean(axis=2)  # pool 8 -> 4
    return cross_entropy(h.reshape(-1) @ params["dense"], example["y"])


@pytest.fixture(scope="session")
def mlp():
    key_p, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    params = mlp_init(key_p)
    batch = {"x": jax.random.normal(key_x, (10, 6)), "y": jax.random.randint(key_y, (10,), 0, 3)}
    return params, batch


@pytest.fixture(scope="session")
def cnn():
    key_p, key_x, key_y = jax.random.split(jax.random.key(1), 3)
    params = cnn_init(key_p)
    batch = {"x": jax.random.normal(key_x, (7, 8)), "y": jax.random.randint(key_y, (7,), 0, 3)}
    return params, batch
