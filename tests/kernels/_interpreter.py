"""Where the Triton test modules run their cases: on a GPU, or in Triton's CPU interpreter in a child process.

TRITON_INTERPRET=1 must be set before the kernels are defined, so a module that finds neither a GPU nor the variable
re-runs itself in a child process with it set, keeping the rest of the suite in its normal process.
"""

import os
import subprocess
import sys

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
RUN_HERE = INTERPRET or ON_GPU
DEVICE = "cuda" if ON_GPU else "cpu"


def run_module_in_interpreter(path: str) -> None:
    """Run the test module at `path` under TRITON_INTERPRET=1 and fail with its output if any case fails."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
