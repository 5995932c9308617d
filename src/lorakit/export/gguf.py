"""`lorakit export --gguf`: a causal-LM adapter as GGUF files for llama.cpp and Ollama, verified.

The flow::

    adapter dir ─► base + adapter (unmerged) ─► logits on check prompts  (the reference)
                ├► LoRA A / B (q, k permuted, scaling folded) ─► lora-<type>.gguf   (llama.cpp --lora)
                └► merge_and_unload ─► HF folder (tokenizer with the adapter's chat template)
                       ─► model-<type>.gguf ─► transformers' GGUF reader ─► same logits? same token ids?
                                            └► Modelfile (Ollama)

GGUF stores a Llama in llama.cpp's naming (``blk.N.attn_q.weight`` ...) and layout. One difference is
not just a name: llama.cpp applies rotary embeddings to *adjacent* pairs of a head's dimensions,
Hugging Face to its two *halves*, so the rows of ``q_proj`` and ``k_proj`` are permuted on the way
in (llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``; transformers' reader undoes it). The
tokenizer travels as metadata: the vocabulary in id order, BPE merges, token types, special ids and
the chat template.

Precision: ``f16`` keeps 2-D weights in float16 and norms in float32; the logits then differ from the
adapter's by float16 rounding only, and the check holds them to a tolerance. ``q8_0`` stores 8-bit
blocks of 32 weights with one scale: its difference is measured and printed, not bounded.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.adapters.build import LoadedAdapter, load_adapter
from lorakit.adapters.folder import adapter_method
from lorakit.config.schema import METHOD_NAMES
from lorakit.export.common import (
    ExportError,
    adapter_name,
    logits_of,
    provenance,
    worst_diff,
    write_provenance,
)
from lorakit.files.atomic import atomic_dir
from lorakit.files.outputs import check_output_folder

GGUF_TYPES = ("f16", "q8_0")
#: Largest |unmerged - GGUF f16| logit difference accepted, relative to the largest |logit|.
F16_RELATIVE_TOLERANCE = 1e-2
#: The Hugging Face architectures this writer lays out in llama.cpp's "llama" architecture.
LLAMA_FAMILY = ("llama",)

# Byte-level BPE pre-tokenizers (tokenizer.json) and llama.cpp's name for the same split
# (tokenizer.ggml.pre); a vocabulary split any other way is refused rather than written wrong.
_GPT2_SPLIT = {"type": "ByteLevel", "use_regex": True}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class GGUFResult:
    out_dir: Path
    model_file: Path
    gguf_type: str
    logit_diff: (
        float  # largest |unmerged adapter - GGUF model read back by transformers| over the check prompts
    )
    logit_scale: float  # largest |logit| of the unmerged adapter (the difference relative to it is the check)
    top1_agreement: float  # share of positions whose most likely next token is the same
    tolerance: float | None  # relative; None for quantised files (measured, not bounded)
    tokens_equal: bool  # the GGUF tokenizer gives the adapter's token ids for every check prompt
    lora_file: Path | None
    lora_diff: float | None  # largest |delta W from the LoRA GGUF - delta W of the adapter|
    lora_skipped: str | None  # why no LoRA GGUF was written
    checked: int
    # With score_test: exact match on the run's test split of the adapter and of the file read back
    scored: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_file": self.model_file.name,
            "gguf_type": self.gguf_type,
            "max_abs_logit_diff": self.logit_diff,
            "max_abs_logit": self.logit_scale,
            "top1_agreement": self.top1_agreement,
            "relative_tolerance": self.tolerance,
            "tokens_equal": self.tokens_equal,
            "lora_file": self.lora_file.name if self.lora_file else None,
            "lora_max_abs_delta_diff": self.lora_diff,
            "lora_skipped": self.lora_skipped,
            "checked_inputs": self.checked,
            "test_exact_match": self.scored,
        }


# --------------------------------------------------------------------------------------------------
# Tensors: names, layout, precision
# --------------------------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Rows of q_proj / k_proj (or of a LoRA B) from Hugging Face's rotary layout (halves) to llama.cpp's
    (adjacent pairs); ``n_head_kv`` heads for k_proj. The same as llama.cpp's ``LlamaModel.permute``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(config: Any) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def gguf_tensor_name(hf_name: str, name_map: Any) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``.

    Raises:
        ExportError: llama.cpp has no tensor of that name for a Llama.
    """
    stem, _, suffix = hf_name.rpartition(".")
    name = name_map.get_name(stem)
    if name is None:
        raise ExportError(
            "--gguf: the merged model has a tensor llama.cpp's llama architecture does not know "
            f"({hf_name}); this model cannot be written as a llama GGUF"
        )
    return f"{name}.{suffix}"


def _stored(data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw GGML type or None): norms and biases (1-D) stay float32, as llama.cpp's
    converter keeps them.
    """
    import gguf

    if data.ndim == 1:
        return data.astype(np.float32), None
    if gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(
            data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0
        ), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def _check_architecture(model: Any) -> None:
    config = model.config
    if config.model_type not in LLAMA_FAMILY or not type(model).__name__.endswith("ForCausalLM"):
        raise ExportError(
            f"--gguf: writes Llama-family causal language models ({', '.join(LLAMA_FAMILY)}); this "
            f"adapter's model is a {type(model).__name__} ({config.model_type}); export with "
            "--merge instead"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(
            f"--gguf: rope scaling '{rope.get('rope_type')}' is not written by lorakit's GGUF "
            "writer; convert the --merge folder with llama.cpp's convert_hf_to_gguf.py"
        )


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_llama_metadata(writer: Any, config: Any, name: str) -> None:
    """The hyperparameters llama.cpp reads for its "llama" architecture (what convert_hf_to_gguf.py
    writes).
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


# --------------------------------------------------------------------------------------------------
# Tokenizer metadata
# --------------------------------------------------------------------------------------------------


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE pre-tokenizer of tokenizer.json.

    Raises:
        ExportError: A split llama.cpp would not reproduce by any name lorakit knows.
    """
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (its loader refuses "gpt2")
    steps = (spec or {}).get("pretokenizers") or []
    kinds = [s.get("type") for s in steps]
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX:
        return "llama-bpe"
    raise ExportError(
        f"--gguf: the tokenizer's pre-tokenizer ({json.dumps(spec)[:120]}) has no llama.cpp name "
        "lorakit knows; convert the --merge folder with llama.cpp's convert_hf_to_gguf.py"
    )


def _add_tokenizer_metadata(writer: Any, tokenizer: Any, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2, Llama 3, Qwen2 use) as GGUF metadata.

    Raises:
        ExportError: Not a byte-level BPE tokenizer, or more tokens than the model has embeddings.
    """
    import gguf

    spec = (
        json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        if (folder / "tokenizer.json").is_file()
        else {}
    )
    model = spec.get("model", {})
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (spec.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise ExportError(
            "--gguf: lorakit writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, "
            "Qwen2); this one is not; convert the --merge folder with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(
            f"--gguf: the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings"
        )
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens = [
        f"[PAD{i}]" for i in range(vocab_size)
    ]  # unused embedding rows get placeholder tokens (llama.cpp's convention)
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (
            gguf.TokenType.NORMAL
            if token not in added
            else gguf.TokenType.CONTROL
            if added[token]
            else gguf.TokenType.USER_DEFINED
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    probe = tokenizer("a")["input_ids"]
    for key, tid in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    # Whether BOS / EOS are added is read off the tokenizer's behaviour, not its flags.
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def write_llama_gguf(
    model: Any, tokenizer: Any, hf_folder: Path, path: Path, *, gguf_type: str, name: str
) -> None:
    """Write a Llama-family causal LM (and its tokenizer) as one GGUF file in llama.cpp's layout.

    Args:
        model: The (merged) ``LlamaForCausalLM``.
        tokenizer: Its tokenizer, chat template set.
        hf_folder: The folder both were saved to (its ``tokenizer.json`` is read for merges and splitting).
        path: The ``.gguf`` file to write.
        gguf_type: ``f16`` or ``q8_0``.
        name: ``general.name``.

    Raises:
        ExportError: Not a Llama-family model, or a tokenizer lorakit cannot describe to llama.cpp.
    """
    import gguf

    _check_architecture(model)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_llama_metadata(writer, config, name)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer_metadata(writer, tokenizer, hf_folder, config.vocab_size)
    names = _name_map(config)
    n_kv = config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_qk(data, config.num_attention_heads, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_qk(data, config.num_attention_heads, n_kv)
        stored, raw = _stored(data, gguf_type)
        writer.add_tensor(gguf_tensor_name(hf_name, names), stored, raw_dtype=raw)
    _write_out(writer)


def _write_out(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lora_pairs(
    peft_model: Any, meta: dict[str, Any]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str | None]:
    """{HF module name: (A, B * scaling)} of a plain LoRA adapter, or ({}, why llama.cpp cannot take it)."""
    lora = meta.get("lora", {})
    if adapter_method(meta) != "lora":
        name = METHOD_NAMES[adapter_method(meta)]
        return {}, f"{name} adapters have no llama.cpp LoRA form (the merged model carries them)"
    if lora.get("use_dora"):
        return {}, "DoRA adapters have no llama.cpp LoRA form (the merged model carries them)"
    if lora.get("modules_to_save"):
        return (
            {},
            f"modules trained in full ({', '.join(lora['modules_to_save'])}) have no place in a "
            "llama.cpp LoRA file (the merged model carries them)",
        )
    pairs = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        if not isinstance(module.lora_A["default"], torch.nn.Linear):
            return {}, f"LoRA on {name.rsplit('.', 1)[-1]} (not a linear layer) has no llama.cpp LoRA form"
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()
        b = module.lora_B["default"].weight.detach().float().cpu().numpy() * float(module.scaling["default"])
        pairs[name.removeprefix("base_model.model.")] = (a, b)
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        return (
            {},
            f"ranks differ between modules ({sorted(ranks)}); llama.cpp's LoRA scaling takes one "
            "alpha per file",
        )
    return pairs, None


def write_lora_gguf(
    pairs: dict[str, tuple[np.ndarray, np.ndarray]], config: Any, path: Path, *, gguf_type: str, name: str
) -> None:
    """A llama.cpp LoRA adapter file (``llama-cli -m base.gguf --lora FILE``), as convert_lora_to_gguf.py
    writes it: ``<tensor>.lora_a`` (r x in) and ``<tensor>.lora_b`` (out x r) per adapted weight.

    The adapter's scaling is folded into B and ``adapter.lora.alpha`` set to the rank, so llama.cpp's
    ``alpha / r`` is 1 whatever scaling (alpha / r, rsLoRA's alpha / sqrt(r)) the adapter used.
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    rank = next(iter(pairs.values()))[0].shape[0]
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    names = _name_map(config)
    n_kv = config.num_key_value_heads or config.num_attention_heads
    dtype = (
        np.float16 if gguf_type == "f16" else np.float32
    )  # llama.cpp applies LoRA in float; q8_0 models get f32 LoRA
    for module, (a, b) in sorted(pairs.items()):
        if module.endswith("self_attn.q_proj"):
            b = permute_qk(
                b, config.num_attention_heads, config.num_attention_heads
            )  # W = B @ A: permuting W's rows is permuting B's
        elif module.endswith("self_attn.k_proj"):
            b = permute_qk(b, config.num_attention_heads, n_kv)
        base = gguf_tensor_name(module + ".weight", names)
        writer.add_tensor(base + ".lora_a", a.astype(dtype))
        writer.add_tensor(base + ".lora_b", b.astype(dtype))
    _write_out(writer)


def read_lora_gguf_deltas(path: Path, config: Any) -> dict[str, np.ndarray]:
    """delta W = B @ A * alpha / r per HF module, read back from a LoRA GGUF with the gguf package's
    reader and un-permuted with transformers' own GGUF code (an independent implementation)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {
        t.name: np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        for t in reader.tensors
    }
    unpermute = LlamaTensorProcessor(
        {
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads or config.num_attention_heads,
        }
    )
    inverse = {gguf_tensor_name(hf, _name_map(config)): hf for hf in _llama_weight_names(config)}
    deltas = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        stem = name.removesuffix(".lora_a")
        a, b = tensors[name], tensors[stem + ".lora_b"]
        delta = unpermute.process(
            b @ a * (alpha / a.shape[0]), stem
        ).weights  # q / k rows back to HF's layout
        deltas[inverse[stem].removesuffix(".weight")] = delta
    return deltas


def _llama_weight_names(config: Any) -> list[str]:
    per_layer = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    return [f"model.layers.{i}.{m}.weight" for i in range(config.num_hidden_layers) for m in per_layer]


def modelfile_text(model_file: str, tokenizer: Any, stops: list[int], system: str | None) -> str:
    """An Ollama ``Modelfile`` for the merged GGUF (``ollama create NAME -f Modelfile``)."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{model_file}"]
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:  # ChatML, in Ollama's Go template syntax (Ollama does not run Jinja)
        lines += [
            'TEMPLATE """{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}",
            "{{ .Content }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '"""',
        ]
    else:
        lines.append(
            "# no TEMPLATE: Ollama uses the chat template stored in the GGUF file "
            "(tokenizer.chat_template) where it recognises it"
        )
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for tid in stops:
        lines.append(f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(tid)}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _top1_agreement(
    got: list[torch.Tensor], want: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]
) -> float:
    same = total = 0
    for g, w, b in zip(got, want, batches, strict=True):
        mask = b["attention_mask"].bool()
        same += int((g.argmax(-1) == w.argmax(-1))[mask].sum())
        total += int(mask.sum())
    return same / max(1, total)


def _same_tokens(adapter_tok: Any, gguf_tok: Any, batches: list[dict[str, torch.Tensor]]) -> bool:
    """The GGUF file's tokenizer (as transformers rebuilds it) encodes every check prompt to the
    adapter's ids.
    """
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            want = ids[mask.bool()].tolist()
            text = adapter_tok.decode(want, skip_special_tokens=False)
            if gguf_tok(text, add_special_tokens=False)["input_ids"] != want:
                return False
    return gguf_tok.chat_template == adapter_tok.chat_template


def _held_out(loaded: Any) -> tuple[list[list[int]], list[str]]:
    """The run's test split as (prompt ids, reference answers), prepared as training prepared it."""
    from lorakit.adapters.importing import UNKNOWN_DATA

    if loaded.config.data.train == UNKNOWN_DATA:
        raise ExportError(
            "--score-test: this adapter was imported, so lorakit does not know its test data; "
            "score it with `lorakit eval` on a file instead, or leave out --score-test"
        )
    split = loaded.task.prepare(loaded.config, loaded.processor).splits.get("test")
    if split is None or "reference" not in split.column_names or not any(split["reference"]):
        raise ExportError(
            "--score-test: this run has no test split with reference answers to score; train with "
            "data.test or data.test_size, or leave out --score-test"
        )
    return split["prompt_ids"], split["reference"]


def _answers(loaded: Any, model: torch.nn.Module, held_out: tuple[list[list[int]], list[str]]) -> list[str]:
    return loaded.task.generate_ids(
        model.eval(), loaded.processor, held_out[0], max_new_tokens=loaded.config.train.max_new_tokens
    )


def _scores(refs: list[str], adapter: list[str], gguf_answers: list[str]) -> dict[str, Any]:
    """Exact match of both sets of answers, counted as training's evaluation counts it."""
    from lorakit.tasks.causal_lm import exact_match

    return {
        "examples": len(refs),
        "adapter": exact_match(refs, adapter),
        "gguf": exact_match(refs, gguf_answers),
        "identical_answers": sum(a == b for a, b in zip(adapter, gguf_answers, strict=True)) / len(refs),
    }


@dataclass
class _Reference:
    """What the unmerged adapter does on the check prompts (and, with --score-test, the test split)."""

    batches: list[dict[str, torch.Tensor]]  # chat prompts, left-padded, of different lengths
    logits: list[torch.Tensor]
    checked: int  # prompts over all batches
    held_out: tuple[list[list[int]], list[str]] | None = None  # the test split: prompt ids, references
    answers: list[str] | None = None  # the adapter's greedy answers to held_out


@dataclass
class _FileCheck:
    """The merged GGUF file read back by transformers, against the reference."""

    reread: torch.nn.Module
    diff: float
    scale: float
    top1: float
    tolerance: float | None
    tokens_equal: bool


def export_gguf(
    adapter: str | Path,
    out_dir: str | Path,
    *,
    gguf_type: str = "f16",
    overwrite: bool = False,
    base_model: str | None = None,
    relative_tolerance: float = F16_RELATIVE_TOLERANCE,
    lora: bool = True,
    score_test: bool = False,
) -> GGUFResult:
    """Write a causal-LM adapter as a merged GGUF model (+ a llama.cpp LoRA file and an Ollama
    Modelfile), verified.

    Args:
        adapter: Adapter directory or run directory of a Llama-family causal-LM adapter.
        out_dir: Folder to write; replaced atomically once the checks passed.
        gguf_type: ``f16`` (checked against ``relative_tolerance``) or ``q8_0`` (difference measured
            and reported).
        overwrite: Replace an existing non-empty ``out_dir``.
        base_model: Load this base model instead of the recorded one (same content hash).
        relative_tolerance: Largest accepted |unmerged - GGUF| logit difference, relative to the
            largest |logit| (f16).
        lora: Also write the adapter as a llama.cpp LoRA GGUF where llama.cpp can take it.
        score_test: Also answer the run's test split greedily (float32) with the unmerged adapter and
            with the file read back, and report both exact matches (what quantisation costs).

    Returns:
        The files written and the measured differences.

    Raises:
        ExportError: Output folder taken, not a Llama-family causal LM, a tokenizer lorakit cannot
            describe to llama.cpp, or a check failed (nothing is written then).
        AdapterError: The adapter cannot be loaded.
    """
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type: '{gguf_type}' is not one of {', '.join(GGUF_TYPES)}")
    out = check_output_folder(out_dir, overwrite=overwrite, error=ExportError)
    loaded = load_adapter(adapter, base_model=base_model, device="cpu")
    _check_gguf_exportable(loaded)
    ref = _unmerged_reference(loaded, score_test=score_test)
    pairs, skipped = lora_pairs(loaded.model, loaded.meta) if lora else ({}, "not asked for (--no-lora)")
    merged = loaded.model.merge_and_unload().eval()
    name = f"{Path(loaded.meta['base_model']['name_or_path']).name} + lorakit adapter"
    model_file = f"model-{gguf_type}.gguf"

    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="lorakit-gguf-") as hf_dir:
        tokenizer = _save_hf_folder(loaded, merged, Path(hf_dir))
        write_llama_gguf(merged, tokenizer, Path(hf_dir), tmp / model_file, gguf_type=gguf_type, name=name)
        check = _check_model_file(tmp, model_file, tokenizer, ref, gguf_type, relative_tolerance)
        scored = None
        if ref.held_out is not None and ref.answers is not None:
            scored = _scores(ref.held_out[1], ref.answers, _answers(loaded, check.reread, ref.held_out))
        lora_file, lora_diff = None, None
        if pairs:
            lora_diff = _write_lora_checked(
                pairs, merged.config, tmp / f"lora-{gguf_type}.gguf", gguf_type, name
            )
            lora_file = out / f"lora-{gguf_type}.gguf"
        _write_modelfile(tmp, model_file, tokenizer, merged, loaded)
        result = GGUFResult(
            out,
            out / model_file,
            gguf_type,
            check.diff,
            check.scale,
            check.top1,
            check.tolerance,
            check.tokens_equal,
            lora_file,
            lora_diff,
            None if pairs else skipped,
            ref.checked,
            scored,
        )
        write_provenance(tmp, provenance("gguf", {adapter_name(loaded): loaded}, result.to_dict()))
    return result


def _check_gguf_exportable(loaded: LoadedAdapter) -> None:
    """Refuse, before any work, an adapter this writer cannot lay out or merge exactly.

    Raises:
        ExportError: Not a Llama-family causal LM (or rope scaling), or a quantised base.
    """
    _check_architecture(loaded.model.get_base_model())
    quant = loaded.meta.get("config", {}).get("model", {}).get("quantization", "none")
    if quant not in (None, "none"):
        raise ExportError(
            f"this adapter was trained on a {quant}-quantised base; export with --base-model "
            "pointing at the unquantised model"
        )


def _unmerged_reference(loaded: LoadedAdapter, *, score_test: bool) -> _Reference:
    """The unmerged adapter's logits on the task's check prompts; with ``score_test`` also its answers
    to the run's test split (before the merge changes the model)."""
    batches = loaded.task.export_batches(loaded.processor, loaded.config.data)
    ref = _Reference(
        batches, [logits_of(loaded.model, b) for b in batches], sum(len(b["input_ids"]) for b in batches)
    )
    if score_test:
        ref.held_out = _held_out(loaded)
        ref.answers = _answers(loaded, loaded.model, ref.held_out)
    return ref


def _save_hf_folder(loaded: LoadedAdapter, merged: torch.nn.Module, folder: Path) -> Any:
    """Save the merged model in Hugging Face format (the tokenizer with the adapter's chat template) and
    return that tokenizer, read back."""
    from transformers import AutoTokenizer

    from lorakit.models.modeling import quiet_transformers

    loaded.task.save_merged(merged, folder, loaded)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(folder)


def _check_model_file(
    tmp: Path, model_file: str, tokenizer: Any, ref: _Reference, gguf_type: str, relative_tolerance: float
) -> _FileCheck:
    """Read the GGUF file back with transformers' GGUF loader (an implementation that is not ours) and
    compare its logits and its tokenizer with the adapter's.

    Raises:
        ExportError: f16 logits beyond the tolerance, or other token ids / chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models.gguf_reading import gguf_read_once
    from lorakit.models.modeling import quiet_transformers

    with quiet_transformers(), gguf_read_once():  # one parse of the file for the model and tokenizer
        reread = AutoModelForCausalLM.from_pretrained(
            str(tmp), gguf_file=model_file, dtype=torch.float32
        ).eval()
        gguf_tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=model_file)
    got = [logits_of(reread, b) for b in ref.batches]
    diff, scale = worst_diff(got, ref.logits, ref.batches), max(float(r.abs().max()) for r in ref.logits)
    tolerance = relative_tolerance if gguf_type == "f16" else None
    if tolerance is not None and not diff <= tolerance * scale:
        raise ExportError(
            f"GGUF check failed: largest |unmerged - GGUF {gguf_type}| logit difference is "
            f"{diff:.3g} > {tolerance:g} x {scale:.3g} (largest |logit|); nothing was written"
        )
    if not _same_tokens(tokenizer, gguf_tok, ref.batches):
        raise ExportError(
            "GGUF check failed: the tokenizer read back from the GGUF file does not give the "
            "adapter's token ids (or its chat template differs); nothing was written"
        )
    return _FileCheck(reread, diff, scale, _top1_agreement(got, ref.logits, ref.batches), tolerance, True)


def _write_lora_checked(
    pairs: dict[str, tuple[np.ndarray, np.ndarray]], config: Any, path: Path, gguf_type: str, name: str
) -> float:
    """Write the llama.cpp LoRA file and read its deltas back; the largest |delta W| difference.

    Raises:
        ExportError: The file does not hold the adapter's adapted weights.
    """
    write_lora_gguf(pairs, config, path, gguf_type=gguf_type, name=name)
    deltas = read_lora_gguf_deltas(path, config)
    want = {m: b @ a for m, (a, b) in pairs.items()}
    if set(deltas) != set(want):
        raise ExportError(
            f"LoRA GGUF check failed: it holds {len(deltas)} adapted weights, the adapter "
            f"{len(want)}; nothing was written"
        )
    return max(float(np.abs(deltas[m] - want[m]).max()) for m in want)


def _write_modelfile(
    tmp: Path, model_file: str, tokenizer: Any, merged: torch.nn.Module, loaded: LoadedAdapter
) -> None:
    """Ollama's Modelfile: the model file, the chat template, the end-of-turn stops, the system prompt."""
    from lorakit.tasks.causal_lm import end_of_turn_ids

    stops = end_of_turn_ids(tokenizer, merged)
    (tmp / "Modelfile").write_text(
        modelfile_text(model_file, tokenizer, stops, getattr(loaded.config.data, "system_prompt", None)),
        encoding="utf-8",
    )
