"""csrc/wgmma.cuh is generated (one PTX wrapper per MMA shape): the committed file must be what the generator writes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_wgmma_header_matches_its_generator(tmp_path):
    out = tmp_path / "wgmma.cuh"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_wgmma.py"), str(out)], check=True)
    committed = ROOT / "gpu-backend" / "ringlinear" / "kernels" / "csrc" / "wgmma.cuh"
    assert out.read_text() == committed.read_text(), "regenerate: python3 tools/gen_wgmma.py " + str(committed.relative_to(ROOT))
