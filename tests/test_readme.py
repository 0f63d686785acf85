"""Every Python block of README.md runs as written, in order, in one fresh interpreter
(the guides' blocks: ``test_docs.py``)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_blocks_run_in_order(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 1
    script = "\n".join(f"# --- README block {i}\n{block}" for i, block in enumerate(blocks))
    (tmp_path / "readme.py").write_text(script)
    done = subprocess.run(
        [sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_readme_links_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    missing = [link for link in local if not (README.parent / link).exists()]
    assert not missing
