"""Runs the `vdiff` command line in a subprocess, as a user would, for end-to-end tests."""

import subprocess
import sys


def vdiff(*args, timeout=900):
    """``python -m vdiff.cli *args``; fails the test with the end of stderr on a non-zero exit."""
    r = subprocess.run(
        [sys.executable, "-m", "vdiff.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r
