"""The npe2 manifest is valid as installed (what the napari hub and `napari -w` read)."""

import subprocess
import sys
from pathlib import Path


def test_npe2_validate_passes():
    npe2 = Path(sys.executable).parent / "npe2"
    out = subprocess.run(
        [str(npe2), "validate", "napari-microclf"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout
