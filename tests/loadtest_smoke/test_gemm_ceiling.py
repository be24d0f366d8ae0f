"""loadtest/gemm_ceiling.py runs on a tiny shape and writes what it prints."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import gemm_ceiling


def test_gemm_ceiling_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.json"
    assert gemm_ceiling.main(["--m", "2", "5", "--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
                              "--ffn", "48", "--vocab", "100", "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["m"] for r in rows] == [2, 5]
    # q/k/v 64 + o 32 + gate/up 96 + down 32 outputs per layer, x2 layers, and the LM head, 2 FLOPs per MAC
    assert rows[0]["step_gflop"] * 1e9 == 2 * 2 * (2 * (64 * 32 + 32 * 32 + 96 * 32 + 32 * 48) + 100 * 32)
    assert all(r["ceiling_tok_s"] > 0 for r in rows)
    assert "| 5 |" in capsys.readouterr().out
