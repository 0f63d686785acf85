"""jaxgen builds into an sdist and a wheel that work outside the source tree.

``python -m build`` makes the sdist, then the wheel from the unpacked sdist (so a file
the sdist leaves out breaks the wheel too). The wheel is installed, not editable, into a
fresh virtual environment whose only other packages are the dependencies of this one
(a ``.pth`` line pointing at them, so nothing is downloaded again), and the commands a
user runs first are run from an empty folder: a module or data file missing from the
package shows as an import error there.
"""

import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import jaxgen

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return out


def _members(dist):
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as w, tarfile.open(sdist) as s:
        return wheel, set(w.namelist()), {m.split("/", 1)[1] for m in s.getnames() if "/" in m}


def test_the_wheel_and_sdist_hold_every_module_the_typing_marker_and_the_license(dist):
    _, wheel, sdist = _members(dist)
    assert "LICENSE" in sdist
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel), sorted(wheel)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "jaxgen").rglob("*.py")}
    assert len(modules) >= 40
    assert modules | {"jaxgen/py.typed"} <= wheel
    assert modules | {"jaxgen/py.typed", "README.md", "pyproject.toml"} <= sdist
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in wheel)


def test_the_installed_wheel_runs_from_a_fresh_environment(dist, tmp_path):
    wheel, _, _ = _members(dist)
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
        + ["--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*argv):
        done = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert run(env / "bin" / "jaxgen", "--version").strip() == f"jaxgen {jaxgen.__version__}"
    assert "--dispersion-method" in run(env / "bin" / "jaxgen", "bound", "--help")
    estimate = (
        "import jax.numpy as jnp, jaxgen, pathlib\n"
        "loss = lambda w, z: 0.5 * (z['x'] @ w - z['y']) ** 2\n"
        "batch = {'x': jnp.eye(4, 3), 'y': jnp.arange(4.0)}\n"
        "stats = jaxgen.gradient_dispersion(loss, jnp.ones(3), batch)\n"
        "print(pathlib.Path(jaxgen.__file__).parent)\n"
        "print(float(stats.dispersion))\n"
    )
    where, dispersion = run(python, "-c", estimate).split()
    assert Path(where) == Path(purelib) / "jaxgen"  # the wheel's copy, not the source tree
    assert (Path(where) / "py.typed").is_file()
    # g_i = (x_i·w − y_i) x_i: (1, 0, 0), 0, (0, 0, −1), 0
    grads = [[1.0, 0, 0], [0, 0, 0], [0, 0, -1.0], [0, 0, 0]]
    mean = [sum(col) / 4 for col in zip(*grads, strict=True)]
    expected = sum(sum((g - m) ** 2 for g, m in zip(gi, mean, strict=True)) for gi in grads) / 4
    assert float(dispersion) == pytest.approx(expected, rel=1e-6)
