"""The command line as a vLLM user types it: positional model, dtype spellings, help that exits 0, typos
answered with the command's own usage and the closest flag, defaults shown once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine.arg_utils import EngineArgs
from engine.config import resolve_dtype
from models.loader import checkpoint_dtype, resolve_model
from server.cli import apply_model_tag, main, serve_parser


def parse(*argv: str):  # type: ignore[no-untyped-def]
    p = serve_parser()
    return apply_model_tag(p.parse_args(list(argv)), p)


def test_positional_model_as_vllm() -> None:
    assert parse("./my-model").model == "./my-model"
    assert parse("./my-model", "--port", "9000").model == "./my-model"
    assert parse("--model", "./m").model == "./m"
    assert parse("./m", "--model", "./m").model == "./m"
    assert EngineArgs.from_cli_args(parse("./m", "--dtype", "bf16")).model == "./m"


def test_model_given_twice_differently_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse("./a", "--model", "./b")
    assert e.value.code == 2 and "give it once" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--help"], ["bench", "--help"], ["inspect", "--help"],
                                  ["soak", "--help"], ["--help"], ["bench", "serving", "--help"]])
def test_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert "usage: depthserve" in out and "python -m" not in out.split("\n\n")[0]


def test_typo_prints_the_subcommand_usage_and_the_closest_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-num-seq", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: depthserve serve") and "did you mean --max-num-seqs?" in err
    with pytest.raises(SystemExit):
        main(["serve", "--dtype", "bf61"])
    assert "did you mean bf16?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--port-number", "1"])  # no command: serve's flags
    assert "did you mean --port" in capsys.readouterr().err
    assert main(["bench", "latncy"]) == 2
    assert "did you mean latency?" in capsys.readouterr().err
    assert main(["./my-model"]) == 2  # vLLM needs `serve` too: say so
    assert "to serve a model: depthserve serve ./my-model" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--help"], ["inspect", "--help"], ["soak", "--help"]])
def test_defaults_shown_once(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "(default:" in out
    assert "(default: None)" not in out and "(default: False)" not in out and "(default: [])" not in out
    for m in re.finditer(r"--[\w-]+ [^-]*?\(default: [^)]*\)[^-]*?\(default:", out):
        pytest.fail(f"default printed twice: {m.group(0)}")


def test_dtype_auto_resolution() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert resolve_dtype("auto", bf16, "cpu")[0] == bf16
    assert resolve_dtype("auto", fp32, "cpu")[0] == fp32
    assert resolve_dtype("auto", fp16, "cpu")[0] == bf16  # emulated on CPUs
    assert resolve_dtype("auto", fp16, "cuda")[0] == fp16
    assert resolve_dtype("auto", None, "cpu")[0] == bf16  # quantized GGUF
    assert resolve_dtype(fp32, bf16, "cpu") == (fp32, "as requested")
    assert EngineArgs().dtype == "auto" and EngineArgs(dtype="auto").create_engine_config().dtype == "auto"


def test_builtin_checkpoint_is_bf16() -> None:
    assert checkpoint_dtype(resolve_model("shakespeare-attnres")) == torch.bfloat16


@pytest.mark.parametrize(("model", "words"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", ["Hugging Face hub id", "does not download", ".gguf file"]),
    ("/nowhere/model.gguf", ["no such .gguf file", "built-in model name"]),
    ("/nowhere/folder", ["neither a folder nor a built-in model", "config.json"]),
])
def test_missing_model_says_what_is_accepted(model: str, words: list[str], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(model)
    for w in words:
        assert w in str(e.value)


def test_inspect_fails_before_work_without_matplotlib(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    import engine.depth_inspect as di

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(di, "inspect", lambda *a, **k: pytest.fail("ran the model before checking matplotlib"))
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--prompt", "x"])
    assert e.value.code == 2 and 'pip install "matplotlib' in capsys.readouterr().err
