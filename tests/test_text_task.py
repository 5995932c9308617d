"""Text-classification specifics: truncation rules shared by training and prediction, model errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.config.schema import ModelConfig
from lorakit.errors import ModelError
from lorakit.tasks import get_task
from lorakit.tasks.text_classification import TextClassificationData, encode_texts, head_tail


def test_head_tail_keeps_both_ends() -> None:
    seq = list(range(100))
    cut = head_tail(seq, 16)
    assert len(cut) == 16 and cut[:4] == [0, 1, 2, 3] and cut[4:] == list(range(88, 100))
    assert head_tail([1, 2, 3], 16) == [1, 2, 3]


@pytest.mark.parametrize("mode", ["head", "tail", "head_tail", None])
def test_truncation_modes_keep_special_tokens(mode: str | None, tiny_bert_dir: Path) -> None:
    task = get_task("text-classification")
    tok = task.load_processor(ModelConfig(name_or_path=str(tiny_bert_dir)), str(tiny_bert_dir))
    text = "great " + "the film " * 20 + "awful"
    cfg = TextClassificationData(train="x.csv", max_length=12, truncation=mode)
    ids = encode_texts(tok, [text], None, cfg)["input_ids"][0]
    assert len(ids) == 12 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    words = tok.convert_ids_to_tokens(ids)
    kept = mode or "head_tail"  # unset: both ends of a single text
    assert ("great" in words) == (kept in {"head", "head_tail"})
    assert ("awful" in words) == (kept in {"tail", "head_tail"})
    if mode is None:  # ... and the start of a text pair, the one rule that works on pairs
        pair = encode_texts(tok, [text], ["dull"], cfg)["input_ids"][0]
        assert (
            len(pair) == 12
            and "great" in tok.convert_ids_to_tokens(pair)
            and "awful" not in tok.convert_ids_to_tokens(pair)
        )


def test_head_tail_rejects_text_pairs() -> None:
    with pytest.raises(ValueError, match="head_tail works on single texts"):
        TextClassificationData(train="x.csv", truncation="head_tail", text_pair_column="b")


def test_unknown_hub_model_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # read at import: the env var alone is too late
    task = get_task("text-classification")
    with pytest.raises(
        ModelError, match="model.name_or_path: could not load a tokenizer from 'nobody/no-such-model'"
    ):
        task.load_processor(ModelConfig(name_or_path="nobody/no-such-model"), "nobody/no-such-model")


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    from lorakit.models.modeling import resolve_model_path

    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(ModelConfig(name_or_path="./no/such/folder"))
    with pytest.raises(
        ModelError, match="package 'no_such_pkg_xyz' of 'pkg://no_such_pkg_xyz/model' is not installed"
    ):
        resolve_model_path(ModelConfig(name_or_path="pkg://no_such_pkg_xyz/model"))


@pytest.mark.parametrize(("multiple", "width"), [(32, 32), (None, 5), (4, 8)])
def test_batches_are_padded_to_a_multiple_of_the_setting(
    multiple: int | None, width: int, tiny_bert_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    collate = get_task("text-classification").collate(
        tok, TextClassificationData(train="x", pad_to_multiple_of=multiple)
    )
    rows = [
        {"input_ids": [101, 7, 8, 9, 102], "attention_mask": [1] * 5, "labels": 0, "length": 5},
        {"input_ids": [101, 7, 102], "attention_mask": [1] * 3, "labels": 1, "length": 3},
    ]
    batch = collate(rows)
    assert batch["input_ids"].shape == (2, width) and batch["attention_mask"].sum().item() == 8


def test_cpu_bf16_training_attention_keeps_the_padding_mask_of_an_encoder(
    tiny_bert_dir: Path, sdpa_calls: list
) -> None:
    """A BERT classifier trained under CPU bf16 autocast runs its attention in fp32 (the training path)
    and still masks padding: a padded row's hidden states are those it has alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lorakit.models import modeling

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    assert modeling.use_fp32_training_attention(model, torch.device("cpu"), torch.bfloat16)
    short, long = [2, 7, 8, 9, 3], [2, 7, 8, 9, 10, 11, 12, 13, 14, 3]
    padded = {
        "input_ids": torch.tensor([short + [0] * 5, long]),
        "attention_mask": torch.tensor([[1] * 5 + [0] * 5, [1] * 10]),
    }

    def last_hidden(**inputs: torch.Tensor) -> torch.Tensor:
        return model(**inputs, output_hidden_states=True).hidden_states[-1][0, :5].float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = last_hidden(**padded)
        alone = last_hidden(input_ids=torch.tensor([short]))
        unmasked = last_hidden(input_ids=padded["input_ids"])  # the short row sees padding
    assert sdpa_calls and all(c == (torch.float32, False) for c in sdpa_calls)  # fp32 kernel, no autocast
    err, without_mask = (batch - alone).abs().max(), (unmasked - alone).abs().max()
    assert err < 0.1 * without_mask, (err, without_mask)
