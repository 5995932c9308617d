"""`lorakit export --vllm`: what vLLM refuses is said before anything is handed over, each problem with its
fix; a servable adapter is laid out as base folder + peft adapters + the command that starts vLLM's server.
The slow test serves SmolLM2 with two adapters in vLLM itself (`make vllm-env`) through the written
serve.sh and compares greedy answers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lorakit.adapters.importing import import_adapter
from lorakit.cli import main
from lorakit.export.common import ExportError
from lorakit.export.vllm import export_vllm

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _adapter(
    base_dir: Path,
    out: Path,
    *,
    seed: int = 0,
    scale: float = 0.3,
    task_type: str = "CAUSAL_LM",
    **lora: object,
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | lora
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(task_type=task_type, **kwargs)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(out)
    import_adapter(out, base_model=str(base_dir))
    return out


def test_a_servable_adapter_is_laid_out_for_vllm_serve(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    adapter = _adapter(tiny_llama_dir, tmp_path / "colours", r=12)
    with pytest.raises(SystemExit) as e:
        main(["export", str(adapter), "--vllm", str(tmp_path / "vllm")])
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out
    base, served = tmp_path / "vllm" / "base", tmp_path / "vllm" / "adapters" / "colours"
    assert (
        (base / "config.json").is_file()
        and (base / "model.safetensors").is_file()
        and (base / "tokenizer.json").is_file()
    )
    assert sorted(p.name for p in served.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # The base is the base: no LoRA layers and not merged (its weights are the original ones).
    from safetensors.torch import load_file

    saved, original = load_file(base / "model.safetensors"), load_file(tiny_llama_dir / "model.safetensors")
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in original)
    assert (
        f"--lora-modules colours={served.resolve()} --max-lora-rank 16" in out
    )  # rank 12 -> vLLM's next allowed value
    assert "--enable-lora" in (tmp_path / "vllm" / "serve.sh").read_text()
    # Provenance beside it, as every export writes: the adapter served and its content hash.
    from lorakit.export.common import read_provenance
    from lorakit.files.hashing import hash_tree

    record = read_provenance(tmp_path / "vllm")
    assert record["kind"] == "vllm" and record["verification"]["max_lora_rank"] == 16
    assert record["adapters"]["colours"]["content_hash"] == hash_tree(adapter)[0]


def test_what_vllm_refuses_is_one_line_with_every_problem(
    tmp_path: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, capsys
) -> None:
    bad = _adapter(
        tiny_llama_dir,
        tmp_path / "bad",
        r=32,
        use_dora=True,
        modules_to_save=["lm_head"],
        target_modules=["q_proj", "embed_tokens"],
    )
    with pytest.raises(SystemExit) as e:
        main(["export", str(bad), "--vllm", str(tmp_path / "out"), "--max-lora-rank", "16"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1, err  # one line, every problem in it
    err = err[0]
    for part in (
        "modules_to_save",
        "lora.modules_to_save: []",
        "DoRA",
        "rank 32 is above the server's --max-lora-rank 16; raise it to 32",
        "does not adapt embed_tokens",
    ):
        assert part in err, part
    assert not (tmp_path / "out").exists()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    clf = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2),
        LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]),
    )
    clf.save_pretrained(tmp_path / "clf")
    import_adapter(tmp_path / "clf", labels=["neg", "pos"])
    with pytest.raises(
        ExportError, match="vLLM serves causal language models; this is a text-classification adapter"
    ):
        export_vllm([tmp_path / "clf"], tmp_path / "out")
    with pytest.raises(ExportError, match="--max-lora-rank: vLLM accepts"):
        export_vllm([_adapter(tiny_llama_dir, tmp_path / "ok")], tmp_path / "out", max_lora_rank=12)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_serves_smollm2_adapters_with_lorakit_generates_answers(
    tmp_path: Path, monkeypatch, smollm2_cache
) -> None:
    """Two adapters on the packaged SmolLM2-135M-Instruct in one vLLM server started by the written
    serve.sh; greedy answers compared with `lorakit generate`'s for the same 20 prompts (token ids
    identical: lorakit renders the prompts), then a chat request naming an adapter."""
    if not VLLM_PYTHON.is_file():
        pytest.fail("vLLM's environment is missing: run `make vllm-env` first")
    monkeypatch.setenv("LORAKIT_CACHE", str(smollm2_cache))  # the base converted once (conftest)
    from lorakit.adapters.build import load_adapter
    from lorakit.config.schema import ModelConfig
    from lorakit.serving.prediction import generate
    from lorakit.tasks.causal_lm import gguf_converted, gguf_parts
    from test_gguf_export import SMOLLM2_GGUF, _smollm2_folder

    gguf_file = _smollm2_folder() / SMOLLM2_GGUF
    folder = Path(gguf_converted(*gguf_parts(ModelConfig(name_or_path=str(gguf_file)), str(gguf_file)))[0])
    adapters = [
        _adapter(
            folder,
            tmp_path / name,
            seed=i,
            scale=0.02,
            r=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        for i, name in enumerate(("one", "two"))
    ]
    v = export_vllm(adapters, tmp_path / "vllm")
    prompts = [
        f"Name {n} {thing}."
        for n in ("one", "two", "three", "four", "five")
        for thing in ("colour", "fruit", "city", "animal")
    ]
    loaded = load_adapter(adapters[0], device="cpu")
    ids = [loaded.task.prompt_ids(loaded.processor, loaded.data_cfg, p) for p in prompts]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    with _serve_sh(v.out_dir / "serve.sh", tmp_path, env) as port:
        # all 40 requests at once: the server batches them, the two adapters mixed in its batches
        jobs = [(name, i) for name in ("one", "two") for i in ids]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: _completion(port, *job), jobs))
        _chat_answers(port)
    ours = [o["output"] for a in adapters for o in generate(a, prompts, max_new_tokens=16, device="cpu")]
    same = sum(a == b for a, b in zip(answers, ours, strict=True))
    print(f"vLLM vs lorakit generate: {same}/{len(ours)} greedy answers identical")
    assert answers[:20] != answers[20:]  # the two adapters answered differently within one batch
    assert same >= 0.9 * len(ours), list(zip(answers, ours, strict=True))[:5]


def _post(port: int, route: str, body: dict) -> dict:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", route, json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    answer = json.loads(r.read())
    assert r.status == 200 and answer["model"] == body["model"], answer
    return answer


def _completion(port: int, adapter: str, prompt_ids: list[int]) -> str:
    """vLLM's greedy answer to a prompt given as token ids (rendered by lorakit), float32 as lorakit's."""
    body = {"model": adapter, "prompt": prompt_ids, "max_tokens": 16, "temperature": 0.0}
    return _post(port, "/v1/completions", body)["choices"][0]["text"].strip()


def _chat_answers(port: int) -> None:
    body = {"model": "two", "messages": [{"role": "user", "content": "Name one fruit."}], "max_tokens": 8}
    assert _post(port, "/v1/chat/completions", body)["choices"][0]["message"]["content"].strip()


@contextlib.contextmanager
def _serve_sh(serve_sh: Path, tmp_path: Path, env: dict[str, str]):
    """The written serve.sh, run as a user would (vLLM's environment first on PATH, the `vllm` command of
    the CPU build did not start), until its OpenAI server answers /health: yields the port."""
    import http.client
    import time

    from conftest import free_port

    port = free_port()
    path = f"{VLLM_PYTHON.parent}{os.pathsep}{env['PATH']}"
    log = (tmp_path / "serve.log").open("w")
    extra = ["--port", str(port), "--max-model-len", "1024", "--dtype", "float32", "--seed", "0"]
    proc = subprocess.Popen(
        ["sh", str(serve_sh), *extra], stdout=log, stderr=subprocess.STDOUT, env=dict(env, PATH=path)
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
