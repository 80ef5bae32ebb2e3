"""The benchmark scripts that only run where a GPU is lent at least parse."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_parses_and_explains_itself():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--dry-run" in out and "9 minutes" in out
