"""The soak (`bench/soak.py`) in its short form: 20 seconds at 500 requests/s, same assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_twenty_second_soak() -> None:
    soak = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "20", "--rate", "500", "--sample-every", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    print(soak.stdout)
    assert soak.returncode == 0, soak.stdout[-3000:] + soak.stderr[-3000:]
    assert "PASSED" in soak.stdout
