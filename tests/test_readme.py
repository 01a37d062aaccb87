"""README.md's python blocks run as written, each in a fresh interpreter in an empty folder (the
token cache in that folder's HOME, so nothing outside it is touched)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_python_block_runs(code, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{code}\n{run.stderr[-3000:]}"


def test_the_readme_table_is_what_the_recorded_demo_printed():
    """README.md's and docs/demo.md's demo table are format_table of the recorded run's summary.json
    (docs/demo_summary.json), and the text quotes that run's paired differences and intervals."""
    import json

    from solarjax.train.recipe import format_table
    root = README.parent
    summary = json.loads((root / "docs" / "demo_summary.json").read_text())
    table = format_table(summary)
    for doc in (README, root / "docs" / "demo.md"):
        blocks = [b.strip("\n") for b in re.findall(r"```\n(stage .*?)```", doc.read_text(), re.S)]
        assert blocks[0] == table, doc  # the first table of each is the demo's
    text = README.read_text()
    for pair, d in summary["paired_difference"].items():
        low, high = summary["paired_interval"][pair]
        assert f"{abs(d):.4f}" in text and f"{low:+.4f} .. {high:+.4f}".replace("+", "") in text.replace("+", ""), pair
