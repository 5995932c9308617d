"""Causal-LM instruction tuning on a tiny random Llama: masking token by token, truncation, packing
boundaries, training, plain-peft reload, generation that stops at the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import COLOURS_OF, make_chat_rows, make_lm_config
from lorakit.cli import main
from lorakit.errors import DataError, ModelError
from lorakit.tasks.causal_lm import (
    IGNORE,
    CausalLM,
    CausalLMData,
    answer_logits,
    block_causal_mask,
    encode_example,
    pack,
    to_messages,
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    folder = tmp_path_factory.mktemp("lm-run")
    data = _jsonl(folder / "chat.jsonl", make_chat_rows(64))
    return lorakit.train(
        make_lm_config(folder, tiny_llama_dir, data, train={"score_base_model": True}), progress=False
    )


def test_only_assistant_tokens_are_labelled(tok) -> None:
    messages = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "what colour is the sky ?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and the grass ?"},
        {"role": "assistant", "content": "green please"},
    ]
    ex = encode_example(tok, messages, max_length=128)
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    labelled = [t for t, lab in zip(tokens, ex["labels"], strict=True) if lab != IGNORE]
    assert labelled == ["blue", "<|im_end|>", "green", "please", "<|im_end|>"]
    for lab, i in zip(ex["labels"], ex["input_ids"], strict=True):
        assert lab in (IGNORE, i)  # a label is the token itself or ignored
    # The prompt of the last answer: everything before it, ending with the generation prompt.
    assert ex["input_ids"][: len(ex["prompt_ids"])] == ex["prompt_ids"]
    assert (
        tok.convert_ids_to_tokens(ex["prompt_ids"])[-2:] == ["<|im_start|>", "assistant"]
        and ex["reference"] == "green please"
    )


def test_alpaca_template_and_sharegpt_rows_become_messages() -> None:
    d = CausalLMData(
        train="x",
        instruction_template="review : {text}",
        output_column="label",
        label_names=["bad", "good"],
        system_prompt="you are helpful",
    )
    assert to_messages({"text": "good film", "label": 1}, d, "alpaca", key="k", index=0) == [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "review : good film"},
        {"role": "assistant", "content": "good"},
    ]
    d2 = CausalLMData(train="x", message_keys={"role": "from", "content": "value"})
    row = {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "blue"}]}
    assert [m["role"] for m in to_messages(row, d2, "chat", key="k", index=0)] == ["user", "assistant"]
    plain = CausalLMData(train="x")
    assert (
        to_messages(
            {"instruction": "say a word", "input": "please", "output": "red"},
            plain,
            "alpaca",
            key="k",
            index=0,
        )[0]["content"]
        == "say a word\n\nplease"
    )
    with pytest.raises(
        DataError, match="role 'robot' is not system / user / assistant; map it with data.role_names"
    ):
        to_messages({"messages": [{"role": "robot", "content": "x"}]}, plain, "chat", key="k", index=3)
    with pytest.raises(DataError, match="row 2 has no assistant answer"):
        to_messages({"messages": [{"role": "user", "content": "x"}]}, plain, "chat", key="k", index=2)


def test_truncation_keeps_the_answer_and_counts_cuts(tok) -> None:
    long_prompt = [{"role": "user", "content": "what " * 40 + "?"}, {"role": "assistant", "content": "blue"}]
    ex = encode_example(tok, long_prompt, max_length=16)
    assert ex["cut"] == 1 and len(ex["input_ids"]) == 16
    assert [
        t
        for t, lab in zip(tok.convert_ids_to_tokens(ex["input_ids"]), ex["labels"], strict=True)
        if lab != IGNORE
    ] == ["blue", "<|im_end|>"]
    long_answer = [{"role": "user", "content": "say a word"}, {"role": "assistant", "content": "red " * 40}]
    ex = encode_example(tok, long_answer, max_length=16)
    assert ex["cut"] == 2 and sum(lab != IGNORE for lab in ex["labels"]) > 0
    lost = [{"role": "user", "content": "what " * 40}, {"role": "assistant", "content": "red " * 40}]
    assert encode_example(tok, lost, max_length=16)["cut"] in (2, 3)


def test_packing_keeps_examples_apart(tiny_llama_dir: Path, tok) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    rows = [encode_example(tok, m["messages"], 64) for m in make_chat_rows(3)]
    packed = pack(rows, max_length=64)
    assert len(packed["input_ids"]) == 1 and packed["seq_lens"][0] == [len(r["input_ids"]) for r in rows]
    task = CausalLM()
    collate = task.collate(tok, CausalLMData(train="x"))
    batch = collate([{k: v[0] for k, v in packed.items()}])
    assert batch["position_ids"][0, rows[0]["input_ids"].__len__()] == 0  # positions restart per example
    with torch.no_grad():
        together = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[0]
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            assert torch.allclose(together[start : start + len(r["input_ids"])], alone, atol=1e-5)
            start += len(r["input_ids"])
    mask = block_causal_mask([[2, 1]], 4, torch.float32)[0, 0]
    assert (mask == 0).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]


@pytest.mark.parametrize("packed", [False, True])
def test_the_head_runs_on_answer_positions_only_and_the_loss_is_unchanged(
    tiny_llama_dir: Path, tok, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """The training loss (vocabulary projection on the answer positions only) equals transformers'
    own loss over full logits, through peft, for every way a model can take ``logits_to_keep``; and
    the head really sees only the answer positions."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.tasks import causal_lm

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    rows = [encode_example(tok, m["messages"], 64) for m in make_chat_rows(5)]
    data = CausalLMData(train="x", packing=packed)
    examples = [{k: v[0] for k, v in pack(rows, 64).items()}] if packed else rows
    batch = CausalLM().collate(tok, data)(examples)
    answers = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert 0 < answers < batch["labels"].numel() // 3  # prompts dominate: the head is skipped there
    expected = model(**batch).loss
    seen: list[int] = []
    hook = base.lm_head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[-2]))
    for mode in ("mask", "window", "none"):
        monkeypatch.setattr(causal_lm, "logits_keep_mode", lambda m, mode=mode: mode)
        seen.clear()
        loss = CausalLM().loss(model, batch)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        logits, targets, rows_of = answer_logits(model, batch)
        assert logits.shape[0] == len(targets) == len(rows_of) == answers
        if mode == "mask":
            assert seen[0] == answers  # [N, H] into the head, not [B, T, H]
    hook.remove()
    monkeypatch.undo()
    assert causal_lm.logits_keep_mode(model) == "mask"  # what transformers' Llama supports today


def test_training_learns_answers_and_generation_stops_at_end_of_turn(
    lm_run, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    meta = json.loads((lm_run.adapter_dir / "lorakit.json").read_text())
    assert meta["task"] == "causal-lm" and meta["label_space"] is None
    assert meta["lora"]["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    evals = [r for r in lm_run.history if r["split"] == "validation"]
    assert evals[-1]["loss"] < evals[0]["loss"] and "perplexity" in evals[-1]
    assert lm_run.test["exact_match"] == 1.0, lm_run.test["samples"]
    metrics = json.loads((lm_run.run_dir / "metrics.json").read_text())
    assert metrics["test_base_model"]["exact_match"] < 0.5  # a random base model does not know the colours
    assert "Sample generations" in (lm_run.run_dir / "report" / "index.html").read_text()

    from lorakit.serving.prediction import generate

    out = generate(
        lm_run.run_dir, ["what colour is the snow ?", "what colour is the blood ?"], max_new_tokens=20
    )
    assert [o["output"] for o in out] == ["white", "red"]  # stopped at <|im_end|>, not 20 tokens of rambling
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(lm_run.run_dir), "what colour is the grass ?", "--json"])
    assert exc.value.code in (0, None)
    assert json.loads(capsys.readouterr().out) == {
        "input": "what colour is the grass ?",
        "output": COLOURS_OF["grass"],
    }


def test_generation_stops_exactly_at_the_end_of_turn_token(lm_run) -> None:
    loaded = lorakit.Predictor.from_adapter(lm_run.adapter_dir).loaded
    task, tok = loaded.task, loaded.processor
    prompt = task.prompt_ids(tok, CausalLMData(train="x"), "what colour is the sky ?")
    gen = loaded.model.generate(
        input_ids=torch.tensor([prompt]),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=0,
    )
    new = tok.convert_ids_to_tokens(gen[0, len(prompt) :].tolist())
    assert new == ["blue", "<|im_end|>"]


def test_plain_peft_gives_identical_logits(lm_run, tiny_llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(lm_run.adapter_dir)
    ).eval()
    ours = lorakit.Predictor.from_adapter(lm_run.adapter_dir).loaded.model
    x = torch.tensor([[2, 5, 10, 11, 12, 3, 2]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-6)


def test_packed_training_and_plain_text(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "chat.jsonl", make_chat_rows(40))
    r = lorakit.train(
        make_lm_config(tmp_path, tiny_llama_dir, data, data={"packing": True}, train={"max_steps": 2}),
        progress=False,
    )
    meta = json.loads((r.adapter_dir / "lorakit.json").read_text())
    # 24 examples of ~13 tokens packed into rows of at most 64 tokens.
    assert meta["data"]["stats"]["sizes"]["train"] == 24 and meta["data"]["sizes"]["train"] == 6
    assert r.history[-1]["split"] == "validation"
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "the sky is blue and the grass is green"}] * 20)
    plan = lorakit.check(
        make_lm_config(tmp_path, tiny_llama_dir, text, data={"validation_size": 4, "test_size": 0})
    )
    assert plan.stats["format"] == "text"


def test_quantised_base_needs_cuda(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = _jsonl(tmp_path / "chat.jsonl", make_chat_rows(24))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="model.quantization: 4bit \\(QLoRA\\) needs a CUDA GPU"):
        lorakit.check(make_lm_config(tmp_path, tiny_llama_dir, data, model={"quantization": "4bit"}))


def test_eval_on_a_new_file_reports_perplexity_and_exact_match(lm_run, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "more.jsonl", make_chat_rows(12))
    m = lorakit.evaluate(lm_run.run_dir, str(data), out_dir=tmp_path / "eval")
    assert m["examples"] == 12 and m["exact_match"] == 1.0 and m["perplexity"] >= 1.0
    assert (tmp_path / "eval" / "report" / "index.html").is_file()


def test_bf16_runs_store_the_frozen_linear_weights_in_bf16_with_the_same_numbers(
    tiny_llama_dir: Path,
) -> None:
    """Under bf16 autocast the frozen Linear weights are stored in bf16, so autocast does not copy them:
    logits and LoRA gradients are bit for bit those of fp32 storage. LoRA matrices, norms, the tied
    embedding / lm_head and DoRA's base layers stay fp32; fp32 runs are left alone."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.models import modeling

    def lora(**kw):  # random weights, the lm_head tied to the input embedding (as in SmolLM2)
        config = AutoConfig.from_pretrained(tiny_llama_dir, tie_word_embeddings=True)
        base = AutoModelForCausalLM.from_config(config)
        return get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, **kw))

    torch.manual_seed(0)
    model = lora(target_modules=["q_proj", "v_proj"])
    stored = copy.deepcopy(model)
    assert modeling.store_frozen_linears_in(stored, None) == 0
    assert modeling.store_frozen_linears_in(stored, torch.bfloat16) == 2 * 7  # 2 layers x 7 projections
    dtypes = {n: p.dtype for n, p in stored.named_parameters()}
    low = {n for n, d in dtypes.items() if d == torch.bfloat16}
    assert low and all(n.endswith(("base_layer.weight", "proj.weight")) and "lora_" not in n for n in low)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n or "embed" in n)
    assert stored.get_output_embeddings().weight is stored.get_input_embeddings().weight  # still tied

    batch = {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]),
    }
    runs = []
    for m in (model, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(**batch).logits
        logits.float().pow(2).mean().backward()
        runs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (fp32_logits, fp32_grads), (low_logits, low_grads) = runs
    torch.testing.assert_close(low_logits, fp32_logits, rtol=0, atol=0)
    assert fp32_grads.keys() == low_grads.keys() and len(fp32_grads) == 2 * 2 * 2
    for n, g in fp32_grads.items():
        torch.testing.assert_close(low_grads[n], g, rtol=0, atol=0)

    dora = lora(target_modules=["q_proj"], use_dora=True)
    assert modeling.store_frozen_linears_in(dora, torch.bfloat16) == 2 * 6
    attention = dora.get_base_model().model.layers[0].self_attn
    assert attention.q_proj.base_layer.weight.dtype == torch.float32  # DoRA's norm reads it outside a matmul
    assert attention.k_proj.weight.dtype == torch.bfloat16


def test_gradient_checkpointing_a_share_of_the_blocks_recomputes_those_only(tiny_llama_dir: Path) -> None:
    """``train.gradient_checkpointing: 0.5`` on four blocks replays blocks 0 and 2 in the backward pass,
    with the gradients of no checkpointing; a task's default is skipped on a model that cannot, the
    user's setting is an error there."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.models.modeling import enable_gradient_checkpointing

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_llama_dir, num_hidden_layers=4)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [6, 7, 8, 9, 10, 11]])

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    with torch.no_grad():  # B != 0, so every LoRA matrix gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    plain = grads()
    assert enable_gradient_checkpointing(model, "tiny llama", 0.5) == 2
    layers, replayed = model.get_base_model().model.layers, []
    for i, layer in enumerate(layers):
        if layer.gradient_checkpointing:
            replay = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, i=i, f=replay, **kw: (
                replayed.append(i),
                f(*a, **kw),
            )[1]
    for a, b in zip(grads(), plain, strict=True):
        torch.testing.assert_close(a, b)
    assert replayed == [0, 2]
    assert enable_gradient_checkpointing(model, "tiny llama", True) == 4
    assert all(layer.gradient_checkpointing for layer in layers)

    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    assert enable_gradient_checkpointing(cnn, "cnn", 0.5, required=False) == 0
    with pytest.raises(ModelError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(cnn, "cnn", 0.5)


def test_cpu_bf16_training_attention_runs_in_fp32_with_sdpa_masks(
    tiny_llama_dir: Path, sdpa_calls: list
) -> None:
    """Under CPU bf16 autocast, attention that will be differentiated runs PyTorch's SDPA kernel in fp32
    (faster there), evaluation stays in bf16, and the masks are SDPA's: a left-padded row gives the
    logits of full precision."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.models import modeling

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    cpu = torch.device("cpu")
    assert not modeling.use_fp32_training_attention(model, cpu, None)  # fp32 runs are left alone
    assert base.config._attn_implementation == "sdpa"
    batch = {
        "input_ids": torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10, 11, 12]]),
        "attention_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]),
    }
    exact = model(**batch).logits.detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain_eval = model(**batch).logits

    assert modeling.use_fp32_training_attention(model, cpu, torch.bfloat16)
    sdpa_calls.clear()  # the reference passes above
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train = model(**batch).logits
        assert sdpa_calls and all(c == (torch.float32, False) for c in sdpa_calls)  # fp32, no autocast
        sdpa_calls.clear()
        with torch.no_grad():
            evaluation = model(**batch).logits
        assert sdpa_calls and all(autocast_on for _, autocast_on in sdpa_calls)  # bf16 kernel
    train.float().sum().backward()  # gradients flow through the fp32 attention
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(evaluation, plain_eval, rtol=0, atol=0)  # evaluation: SDPA as before
    real = batch["attention_mask"].bool()
    err = (train.float() - exact)[real].abs().max()
    unmasked = model(input_ids=batch["input_ids"]).logits.detach()  # row 0 attends to its padding
    assert err < 0.1 * (unmasked - exact)[real].abs().max()
