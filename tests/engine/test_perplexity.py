"""`depthserve eval perplexity` equals a perplexity computed with the reference forward, window by window."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.perplexity import main, perplexity, windows
from models.tokenizer import Tokenizer
from tests.tiny import CORPUS, tiny_config, write_tiny

TEXT = CORPUS[:400]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    return write_tiny(tmp_path_factory.mktemp("m"), tiny_config("block", 2, layers=3), tokenizer_from=tokenizer_dir)


def _reference_nll(ref, ids: list[int], max_length: int, stride: int) -> float:
    """Window by window with the full-recompute reference: context = the window's earlier tokens."""
    nll = 0.0
    for start, scored, end in windows(len(ids) - 1, max_length, stride):
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids[start:end]]))[0].float(), dim=-1)  # [W, V]
        nll -= sum(float(logp[p - start - 1, ids[p]]) for p in range(scored, end))
    return nll


def test_windows_cover_every_token_once() -> None:
    for n, length, stride in ((1, 2, 1), (10, 4, 3), (10, 4, 1), (50, 16, 5), (7, 100, 50)):
        spans = list(windows(n, length, stride))
        assert [p for _, s, e in spans for p in range(s, e)] == list(range(1, n + 1))
        assert all(e - s <= length and s < f for s, f, e in spans)  # a token of context before each scored one
    with pytest.raises(ValueError, match="stride"):
        list(windows(10, 4, 4))


@pytest.mark.parametrize(("max_length", "stride"), [(None, None), (24, 23), (24, 8)], ids=["one", "disjoint", "overlap"])
def test_equals_reference(tiny, max_length: int | None, stride: int | None) -> None:
    folder, ref = tiny
    llm = LLM(str(folder), max_model_len=256, max_num_batched_tokens=32)  # chunked prefill too
    res = perplexity(llm, TEXT, "tiny", max_length, stride)
    tok = Tokenizer(folder)
    ids = [tok.bos_token_id, *tok.encode(TEXT, add_special_tokens=False)]
    assert len(ids) < 255  # one window by default
    nll = _reference_nll(ref, ids, max_length or 255, stride or (max_length or 255) - 1)
    assert res.tokens == len(ids) - 1
    assert res.perplexity == pytest.approx(math.exp(nll / res.tokens), rel=1e-4)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-4)


def test_cli_table_and_json(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ppl.json"
    argv = ["perplexity", "--model", str(folder), "--model", str(folder), "--file", str(text),
            "--max-length", "64", "--output-json", str(out), "--num-threads", "1"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [sorted(r) for r in rows] == [["bits_per_byte", "model", "perplexity", "tokens"]] * 2
    assert rows[0] == rows[1] and rows[0]["model"] == folder.name
    captured = capsys.readouterr()
    assert "| model | perplexity |" in captured.out and folder.name in captured.out
    assert "windows" in captured.err  # progress on stderr
    (tmp_path / "empty.txt").write_text("")
    assert main(["perplexity", "--model", str(folder), "--file", str(tmp_path / "empty.txt")]) == 2
    assert main(["perplexity", "--model", str(tmp_path / "nope"), "--file", str(text)]) == 2
    assert main(["perplexity", "--model", str(folder), "--file", str(text), "--max-length", "9999"]) == 2
    assert "exceeds" in capsys.readouterr().err
