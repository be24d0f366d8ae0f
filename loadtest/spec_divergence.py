"""Where greedy outputs with and without n-gram drafts part, and how close the fp32 model's top two tokens are there.

In fp32 they never part (tests/engine/test_spec_decode.py). In bf16 a verifying step's rows round differently from
a one-row step, so outputs may part at near ties; this shows the margin at each parting point.

    python -m loadtest.spec_divergence --model smollm2-135m-instruct --requests 3
"""

from __future__ import annotations

import argparse

from engine import LLM, SamplingParams
from loadtest.bench_models import load_text
from loadtest.bench_spec import make_jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=3, help="requests per workload (copy, chat)")
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args(argv)
    kw = {"enable_prefix_caching": False, "kv_cache_memory": "1GiB"}
    spec_cfg = {"method": "ngram", "num_speculative_tokens": 4}
    llm = LLM(a.model, dtype=a.dtype, speculative_config=spec_cfg, **kw)
    eng, text, parted = llm.engine, load_text(None), []
    for w in ("copy", "chat"):
        for j in make_jobs(llm, w, text, a.requests, 160, a.max_tokens):
            outs = []
            for on in (False, True):
                eng.scheduler.spec = eng.config.speculative if on else None
                outs.append(llm.generate([{"prompt_token_ids": j.prompt}], j.params)[0].outputs[0].token_ids)
            plain, spec = outs
            i = next((k for k in range(min(len(plain), len(spec))) if plain[k] != spec[k]), None)
            print(f"{w}: {len(plain)} tokens, first difference at {i}")
            if i is not None:
                parted.append((w, j.prompt + list(plain[:i]), plain[i], spec[i], i))
    llm.shutdown()
    if parted:
        ref = LLM(a.model, dtype="float32", **kw)
        for w, prefix, p, s, i in parted:
            lp = ref.generate([{"prompt_token_ids": prefix}], SamplingParams(temperature=0, max_tokens=1,
                                                                             logprobs=2))[0].outputs[0].logprobs[0]
            (t1, l1), (t2, l2) = lp.top[:2]
            print(f"{w} at {i}: plain {p}, spec {s}; fp32 top two {t1} ({l1:.3f}), {t2} ({l2:.3f}): "
                  f"{l1 - l2:.3f} nats apart")
        ref.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
