"""``jaxgen bound`` gives the numbers the code gave before the experiments reshape.

``fixtures/bound_before_reshape.json`` holds ``result.json`` of seven small
configurations, recorded with the trainer of commit 77aed07 (``jaxgen/experiments/
train.py``, before it was split into config, methods, step, loop, results). The flags
are translated to today's names: ``--regularizer`` became ``--method`` and the old
``--method`` (of the dispersion) ``--dispersion-method``.
"""

import json
from pathlib import Path

import pytest

from jaxgen import cli

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "bound_before_reshape.json").read_text())
RENAMED = {"--regularizer": "--method", "--method": "--dispersion-method"}


def _today(argv):
    return [RENAMED.get(a, a) if a.startswith("--") else a for a in argv]


@pytest.mark.parametrize("name", ["mlp-momentum-milestones-track2", "two-layer-relu", "dgc"])
def test_same_configuration_same_result(name, tmp_path):
    case = FIXTURE["cases"][name]
    assert cli.main(["bound", *_today(case["argv"]), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    before = case["result"]
    assert set(result) - {"seconds", "jaxgen_version"} == set(before)
    for key, value in before.items():
        if key != "config":  # the configuration's own keys were renamed
            assert result[key] == value, key
