"""`depthserve inspect` writes the weights as JSON and two heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

from engine.depth_inspect import main
from tests.tiny import tiny_config, write_tiny


def test_inspect_writes_json_and_pngs(tmp_path: Path, tokenizer_dir: Path) -> None:
    folder, _ = write_tiny(tmp_path / "m", tiny_config("block", 2, layers=3), tokenizer_from=tokenizer_dir)
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--prompt", "To be, or not", "--max-tokens", "3", "--out-dir", str(out)]) == 0
    data = json.loads((out / "depth_attention.json").read_text())
    assert data["sites"][0] == "L0.attn" and data["sites"][-1] == "output" and len(data["sites"]) == 7
    req = data["requests"][0]
    assert len(req["depth_attention"]) == len(req["tokens"])
    assert all(abs(sum(site) - 1) < 1e-3 for entry in req["depth_attention"] for site in entry)
    for png in ("depth_mean.png", "depth_token.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
