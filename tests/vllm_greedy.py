"""Run in vLLM's own environment (make vllm-env) by tests/test_vllm_export.py: greedy answers of a base
model with LoRA adapters, every prompt in one `generate` call (one batch, adapters mixed).

Usage: python vllm_greedy.py JOB.json ANSWERS.json
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":  # vLLM starts its engine in a child process that re-imports this file
    from pathlib import Path

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    job = json.loads(Path(sys.argv[1]).read_text())
    names = list(job["adapters"])
    requests = {n: LoRARequest(n, i + 1, job["adapters"][n]) for i, n in enumerate(names)}
    llm = LLM(
        model=job["base"],
        enable_lora=True,
        max_lora_rank=job["max_lora_rank"],
        max_loras=len(names),
        dtype="float32",
        max_model_len=1024,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], skip_special_tokens=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in job["prompt_ids"]],
        params,
        lora_request=[requests[n] for n in job["adapter_of_prompt"]],
        use_tqdm=False,
    )
    Path(sys.argv[2]).write_text(json.dumps([o.outputs[0].text.strip() for o in outs]))
