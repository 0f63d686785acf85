"""The documentation site builds cleanly and says what the code does.

The site is built once per session (``conftest.site``, ``sphinx-build -W``: a broken
cross-reference, a public name missing from the API reference or without a docstring, a
notebook cell that raises, all fail it); the tests below read what it wrote. Every
Python block of the pages runs, page by page in a fresh namespace, and every command
shown parses.
"""

import argparse
import html
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jaxgen
from jaxgen import bounds, cli

DOCS = Path(__file__).parent.parent / "docs"
PAGES_WITH_CODE = sorted(
    p for p in DOCS.rglob("*.md") if "_build" not in p.parts and "```python" in p.read_text()
)


def test_the_site_builds_with_warnings_as_errors(site):
    for page in ("index", "getting-started", "paper", "benchmarks", "cli", "changelog"):
        assert (site / f"{page}.html").is_file(), page
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()  # formulas offline


def _public_names():
    names = [f"jaxgen.{n}" for n in jaxgen.__all__ if n not in ("bounds", "noise", "nnx")]
    names += [f"jaxgen.bounds.{n}" for n in bounds.__all__]
    names += [f"jaxgen.noise.{n}" for n in jaxgen.noise.__all__]
    names += [f"jaxgen.nnx.{n}" for n in jaxgen.nnx.__all__]
    return names


def test_every_public_name_is_in_the_api_reference(site):
    anchors = set()
    for page in (site / "api").glob("*.html"):
        anchors |= set(re.findall(r'id="(jaxgen\.[\w.]+)"', page.read_text()))
    missing = [name for name in _public_names() if name not in anchors]
    assert not missing
    assert len(_public_names()) >= 30


def test_the_build_refuses_a_missing_or_undocumented_public_name(monkeypatch):
    monkeypatch.syspath_prepend(str(DOCS))
    import conf

    everything = set(conf.public_names())
    assert conf.public_names() == _public_names()
    assert conf.api_problems(everything) == []
    assert conf.api_problems(everything - {"jaxgen.gmp"}) == [
        "public name jaxgen.gmp is missing from the API reference"
    ]
    monkeypatch.setattr(jaxgen.bounds.eq2, "__doc__", None)
    assert conf.api_problems(everything) == ["public name jaxgen.bounds.eq2 has no docstring"]


def test_the_cli_reference_lists_every_command_and_flag(site):
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "cli.html").read_text()))
    parser = cli._parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    for name, command in commands.choices.items():
        assert f"jaxgen {name}" in text, name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # -h, in every usage line
            for flag in action.option_strings:
                assert flag in text, (name, flag)


def test_the_benchmarks_page_holds_only_current_tables(site):
    source = (DOCS.parent / "benchmarks" / "README.md").read_text()
    for word in ("Before", "Earlier", "earlier measurements", "After issue"):
        assert f"# {word}" not in source and f"## {word}" not in source
    page = (site / "benchmarks.html").read_text()
    assert "Gradient dispersion" in page and "Hessian trace" in page


PAGES_RUNNER = """
import os, sys, traceback
for page, folder, code in PAGES:
    os.makedirs(folder)
    os.chdir(folder)
    try:
        exec(compile(code, page, "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"the Python blocks of {page} failed")
"""


def test_the_python_blocks_of_each_page_run_in_order(tmp_path):
    """Each page's blocks, in order, as one script in a fresh namespace and folder; the
    pages share one interpreter (and its compiled programs)."""
    assert {p.relative_to(DOCS).as_posix() for p in PAGES_WITH_CODE} >= {
        "getting-started.md",
        "guides/statistics.md",
        "guides/bounds.md",
        "guides/regularizers.md",
        "guides/training.md",
        "guides/devices.md",
    }
    pages = []
    for i, path in enumerate(PAGES_WITH_CODE):
        blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
        code = "\n".join(f"# --- block {j}\n{block}" for j, block in enumerate(blocks))
        pages.append((str(path.relative_to(DOCS)), str(tmp_path / f"page{i}"), code))
    (tmp_path / "pages.py").write_text(f"PAGES = {pages!r}\n{PAGES_RUNNER}")
    done = subprocess.run(
        [sys.executable, "pages.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (training,) = [folder for page, folder, _ in pages if page == "guides/training.md"]
    assert (Path(training) / "runs" / "dgc" / "result.json").is_file()


def _shown_commands():
    """Every ``jaxgen ...`` command of a bash block in the docs and the README, its
    continuation lines joined, comments and environment assignments dropped."""
    sources = [*DOCS.rglob("*.md"), DOCS.parent / "README.md"]
    for path in (p for p in sources if "_build" not in p.parts):
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words[:1] == ["jaxgen"] and "$id" not in line:
                    yield path.name, words[1:]


def test_every_command_shown_in_the_docs_parses_into_a_valid_configuration():
    from jaxgen.experiments import flags

    shown = list(_shown_commands())
    assert len(shown) >= 20
    for page, argv in shown:
        try:
            args = cli._parser().parse_args(argv)
        except SystemExit as exit_info:
            if argv in (["--version"], ["--help"]) and exit_info.code == 0:
                continue
            raise AssertionError(f"{page}: jaxgen {shlex.join(argv)}") from None
        if args.command == "demo":
            continue
        config = flags.config_from_args(args)
        if args.command == "compare":
            assert flags.parse_methods(args.methods, args), (page, argv)
        assert config.batch_size >= 1
