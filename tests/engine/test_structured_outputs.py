"""Structured outputs on a tiny random AttnRes model: whatever the model prefers, the output follows the grammar."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import InvalidParameterError
from engine.structured import StructuredOutputsParams, apply_bitmask
from tests.tiny import tiny_config, write_tiny

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Romeo", "Juliet", "Tybalt"]},
        "age": {"type": "integer", "minimum": 10, "maximum": 99},
        "alive": {"type": "boolean"},
        "house": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["id"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "alive", "house", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["To be, or not", "All the world", "Friends, Romans", "Now is the winter", "the slings and"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> LLM:
    folder, _ = write_tiny(tmp_path_factory.mktemp("so"), tiny_config("block", 2, layers=3), tokenizer_from=tokenizer_dir)
    return LLM(str(folder), max_model_len=256, seed=1)


def _validate(doc: object) -> None:
    """SCHEMA, by hand (and by jsonschema_rs when installed)."""
    assert isinstance(doc, dict) and set(doc) == set(SCHEMA["required"])
    assert doc["name"] in ("Romeo", "Juliet", "Tybalt")
    assert isinstance(doc["age"], int) and 10 <= doc["age"] <= 99
    assert isinstance(doc["alive"], bool)
    assert doc["house"].keys() == {"id"} and 0 <= doc["house"]["id"] <= 9
    assert isinstance(doc["tags"], list) and len(doc["tags"]) <= 3 and set(doc["tags"]) <= {"a", "b"}
    try:
        import jsonschema_rs
    except ImportError:
        return
    jsonschema_rs.validate(SCHEMA, doc)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_always_validates(llm: LLM, temperature: float) -> None:
    p = SamplingParams(temperature=temperature, n=2, seed=7, max_tokens=100, logprobs=1,
                       structured_outputs=StructuredOutputsParams(json=SCHEMA))
    for out in llm.generate(PROMPTS, p):
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            _validate(json.loads(c.text))
            assert all(math.isfinite(lp.logprob) for lp in c.logprobs)  # the masked distribution's


def test_regex_choice_grammar_always_match(llm: LLM) -> None:
    cases = [
        ({"regex": r"[a-z]{3,6}-[0-9]{2}"}, lambda t: re.fullmatch(r"[a-z]{3,6}-[0-9]{2}", t)),
        ({"choice": ["yes", "no", "maybe not"]}, lambda t: t in ("yes", "no", "maybe not")),
        ({"grammar": 'root ::= "to be" | "not to be" ("," " " [a-z] [a-z]?)?'},
         lambda t: re.fullmatch(r"(to be|not to be(, [a-z]{1,2})?)", t)),
        ({"grammar": 'start: "x" NUM\nNUM: /[0-9]{1,3}/'}, lambda t: re.fullmatch(r"x[0-9]{1,3}", t)),
    ]
    for spec, ok in cases:
        for seed in (1, 2):
            p = SamplingParams(temperature=1.2, top_k=50, top_p=0.9, seed=seed, n=3, max_tokens=60,
                               structured_outputs=spec)
            for out in llm.generate(PROMPTS[:3], p):
                for c in out.outputs:
                    assert c.finish_reason == "stop" and ok(c.text), (spec, c.text)


def test_eos_only_when_the_grammar_accepts_and_min_tokens_yields(llm: LLM) -> None:
    # exactly five letters: EOS may not come early, and the request ends when the grammar is complete
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs={"regex": "[a-z]{5}"})
    texts = [o.outputs[0].text for o in llm.generate(PROMPTS, p)]
    assert all(re.fullmatch("[a-z]{5}", t) for t in texts), texts
    # min_tokens cannot force tokens a finished grammar forbids
    p = SamplingParams(temperature=0, max_tokens=20, min_tokens=10, structured_outputs={"choice": ["a"]})
    c = llm.generate(PROMPTS[0], p)[0].outputs[0]
    assert c.text == "a" and c.finish_reason == "stop"


def test_stop_strings_and_unconstrained_rows_in_the_same_batch(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], free)[0].outputs[0].token_ids
    stopped = SamplingParams(temperature=0, max_tokens=40, stop=["-"], structured_outputs={"regex": "[a-z]{4}-[0-9]"})
    outs = llm.generate([PROMPTS[0], PROMPTS[1]], [stopped, free])
    assert re.fullmatch("[a-z]{4}", outs[0].outputs[0].text) and outs[0].outputs[0].stop_reason == "-"
    assert outs[1].outputs[0].token_ids == alone  # the grammar row leaves its neighbours alone


@pytest.mark.parametrize(("spec", "param"), [
    ({"regex": "a(b"}, "regex"),
    ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "json"),
    ({"json": "{not json"}, "json"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"choice": []}, "choice"),
    ({"regex": "a" * 70000}, "regex"),
])
def test_invalid_specs_name_their_field(llm: LLM, spec: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, structured_outputs=spec))
    assert e.value.param == param
    assert not llm.engine.has_unfinished_requests()


def test_exactly_one_constraint() -> None:
    for spec in ({}, {"regex": "a", "choice": ["a"]}):
        with pytest.raises(InvalidParameterError, match="exactly one"):
            SamplingParams(structured_outputs=spec)
    with pytest.raises(InvalidParameterError, match="structured_outputs"):
        SamplingParams(structured_outputs={"pattern": "a"})


def test_compiled_grammars_are_cached(llm: LLM) -> None:
    eng = llm.engine
    spec = StructuredOutputsParams(regex="[0-9]{3}")
    eng.compile_grammar(spec)
    n = eng._grammars.cache_size
    eng.compile_grammar(StructuredOutputsParams(regex="[0-9]{3}"))
    assert eng._grammars.cache_size == n


def test_apply_bitmask_masks_rows_and_padding() -> None:
    logits = torch.zeros(3, 70)  # 70 columns, a mask of 2 words (64 tokens): 64..69 are padding
    bm = torch.zeros(3, 2, dtype=torch.int32)
    bm[0, 0] = 0b101  # tokens 0 and 2
    bm[2, 1] = 1  # token 32
    apply_bitmask(logits, bm, [0, 2])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).all()  # not a constrained row
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [32]


def test_slow_compiles_are_refused_with_a_bound(llm: LLM) -> None:
    from engine.structured import GrammarCompiler

    eng = llm.engine
    slow = GrammarCompiler(eng.tokenizer, eng.model_config.eos_token_ids, eng.model_config.vocab_size,
                           timeout_s=1e-9)  # nothing compiles that fast
    big = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "[a-z]{1,20}"} for i in range(50)}}
    with pytest.raises(InvalidParameterError, match="took more than") as e:
        slow.matcher(StructuredOutputsParams(json=big))
    assert e.value.param == "json"


@pytest.mark.parametrize("mode", ["none", "full"])
def test_standard_and_full_attnres_models(tmp_path: Path, tokenizer_dir: Path, mode: str) -> None:
    folder, _ = write_tiny(tmp_path, tiny_config(mode, layers=3), tokenizer_from=tokenizer_dir)
    llm = LLM(str(folder), max_model_len=128, seed=1)
    p = SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=30, structured_outputs={"regex": "[a-z]{2,4}-[0-9]"})
    for c in llm.generate(PROMPTS[:2], p)[0].outputs:
        assert re.fullmatch("[a-z]{2,4}-[0-9]", c.text), c.text


def test_preempted_requests_keep_their_grammar_state(tokenizer_dir: Path, tmp_path: Path) -> None:
    folder, _ = write_tiny(tmp_path, tiny_config("block", 2, layers=3), tokenizer_from=tokenizer_dir)
    llm = LLM(str(folder), max_model_len=64, num_kv_blocks=8, block_size=8, seed=1)  # 5 requests cannot all fit
    small = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"enum": ["x", "y"]}},
             "required": ["a", "b"], "additionalProperties": False}
    p = SamplingParams(temperature=1.0, seed=4, max_tokens=40, structured_outputs={"json": small})
    for out in llm.generate(PROMPTS, p):
        doc = json.loads(out.outputs[0].text)
        assert set(doc) == {"a", "b"} and 0 <= doc["a"] <= 9 and doc["b"] in ("x", "y")
    assert llm.engine.scheduler.stats.num_preemptions > 0
