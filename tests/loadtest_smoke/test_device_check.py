"""loadtest.device_check runs end to end on the CPU (--device cpu --quick) and writes its files.

The benchmarks part is skipped here for time (the CPU allocates multi-GiB caches for them); it is run by
`python -m loadtest.device_check --device cpu --quick --out DIR` by hand and on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_device_check_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "loadtest.device_check", "--out", str(out), "--device", "cpu",
                           "--quick", "--skip-bench"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout and "PASS engine_vs_reference[block3-L5]" in proc.stdout
    result = json.loads((out / "device_check.json").read_text())
    assert result["passed"] and result["device"] == "cpu" and result["quick"]
    names = [c["name"] for c in result["checks"]]
    assert any(n.startswith("imports") for n in names)
    assert sum(n.startswith("engine_vs_reference") for n in names) == 6  # per model: eager, padded(static-table)
    assert sum(n.startswith("prompt_logprobs") for n in names) == 3
    padded = [c for c in result["checks"] if c["name"].endswith("padded(static-table)")]
    assert len(padded) == 3 and all(s["padded_steps"] > 0 for c in padded for s in c["detail"].values())
    if importlib.util.find_spec("triton") is not None:  # the kernel tests, interpreted (a few with --quick)
        assert "triton kernel tests (interpreted) cpu" in names and (out / "triton_tests.log").exists()
    md = (out / "RESULTS-gpu.md").read_text()
    assert md.startswith("# Device check") and "checks passed" in md
