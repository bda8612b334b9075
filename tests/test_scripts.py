"""The benchmark and entry-point scripts stay runnable: each imports and parses its arguments (`--help`) on a CPU
machine. The GPU work they do is run on the GPU machine, not here; this catches a broken import or option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Scripts are the files with a __main__ block; the rest (e.g. bench/mlstm_bench_utils.py) are modules they import.
SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in ("bench", "train") for p in (REPO / folder).glob("*.py")
                 if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_and_shows_help(script):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "kernels"), str(REPO)]))
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower(), done.stdout[:500]
