"""The `lorakit` command: a thin layer over the Python API.

It parses arguments, calls the same functions a Python user would, prints results, and turns
:class:`~lorakit.errors.LorakitError` into ``error: <one line>`` with exit code 2 (no traceback).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lorakit.errors import LorakitError

app = typer.Typer(
    name="lorakit",
    help="Fine-tune, evaluate, publish and serve LoRA adapters.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from lorakit import __version__

        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune, evaluate, publish and serve LoRA adapters."""


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config value: section.key=value (repeatable).", metavar="KEY=VALUE"
    ),
]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped, e.g. by test capture)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("lorakit")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        import warnings

        import datasets
        from transformers.utils import logging as hf_logging

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _lines(file: Path | None) -> list[str]:
    """The non-empty lines of a ``--file`` (none without one)."""
    from lorakit.errors import DataError

    if file is None:
        return []
    try:
        return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise DataError(f"--file: '{file}' does not exist") from None
    except UnicodeDecodeError:
        raise DataError(f"--file: '{file}' is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None


@app.command()
def check(config: Annotated[Path, typer.Argument(help="Run config (YAML).")], set_: SetOpt = None) -> None:
    """Validate a config and dry-run it: data sizes and labels, model, LoRA targets, parameter counts."""
    from lorakit.training.preflight import check as run_check

    _setup_logging()
    plan = run_check(config, overrides=set_ or [])
    typer.echo("\n".join(plan.lines()))


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run directory.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its newest checkpoint (an error when there is none).",
        ),
    ] = False,
    resume_or_start: Annotated[
        bool,
        typer.Option(
            "--resume-or-start",
            help="Continue from the newest checkpoint if there is one, else start (for restart loops).",
        ),
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Fine-tune a LoRA adapter; the best one (by validation metric) lands in <output.dir>/adapter."""
    from lorakit.training import train as run_train

    _setup_logging()
    if (resume or resume_or_start) and overwrite:
        raise LorakitError(
            f"{'--resume' if resume else '--resume-or-start'} and --overwrite exclude each other: "
            "resume continues a run, overwrite starts it again"
        )
    mode = "auto" if resume_or_start else resume
    result = run_train(  # a process of its own: it shares the CPU cores with the user's other trainings
        config,
        overrides=set_ or [],
        overwrite=overwrite or None,
        resume=mode,
        progress=not no_progress,
        share_cores=True,
    )
    if not result.main:  # a data-parallel run: rank 0 reports
        return
    metric = result.best_metric
    typer.echo(f"best validation {metric}: {result.best_value:.4f}")
    if result.test:
        n = sum(v["support"] for v in result.test.get("per_class", {}).values()) or result.test.get(
            "examples", "?"
        )
        shown = {
            k: v for k, v in result.test.items() if isinstance(v, float) and k not in ("tokens", "examples")
        }
        typer.echo(
            f"held-out test ({n} examples never trained on): "
            + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        )
    typer.echo(
        f"trained {result.trainable_params:,} of {result.total_params:,} parameters in "
        f"{result.seconds / 60:.1f} min"
    )
    typer.echo(f"adapter: {result.adapter_dir}")
    if (result.run_dir / "report" / "index.html").is_file():
        typer.echo(f"report:  {result.run_dir / 'report' / 'index.html'}")


@app.command(
    help=(
        "Search hyperparameters with Optuna (the config's tune: section); each trial is a "
        "`lorakit train` run. Run it again to continue."
    )
)
def tune(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) with a tune: section.")],
    set_: SetOpt = None,
) -> None:
    from lorakit.experiments.study_report import table
    from lorakit.experiments.tuning import tune as run_tune

    _setup_logging()
    summary = run_tune(config, overrides=set_ or [])
    typer.echo("\n".join(table(summary)))
    best, folder = summary["best"], Path(summary["study_dir"])
    if best is None:
        raise LorakitError(
            f"no trial of study '{summary['study']}' completed; see the logs in {folder / 'logs'}"
        )
    test = f", held-out test {best['test_value']:.4f}" if best.get("test_value") is not None else ""
    typer.echo(
        f"best: trial {best['number']}, validation {summary['metric']} {best['value']:.4f}{test} "
        f"({best['run_dir']})"
    )
    typer.echo(f"best config: {folder / 'best.yaml'}")
    typer.echo(f"report:      {folder / 'report' / 'index.html'}")


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="Run directory or adapter directory.")],
    data: Annotated[str, typer.Option("--data", help="Labelled data file with the training columns.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default <run>/eval-<data>).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Score only the first N rows.")] = None,
) -> None:
    """Evaluate an adapter on a data file: accuracy, macro-F1, per-class scores, confusion matrix, report."""
    from lorakit.evaluation.scoring import evaluate

    _setup_logging()
    m = evaluate(path, data, out_dir=out, batch_size=batch_size, max_samples=max_samples)
    typer.echo(
        ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
        + f" on {m['examples']:,} examples"
    )
    typer.echo(f"metrics: {Path(m['output_dir']) / 'metrics.json'}")
    typer.echo(f"report:  {Path(m['output_dir']) / 'report' / 'index.html'}")


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="A finished run folder.")],
    run_b: Annotated[
        Path | None, typer.Argument(help="Another, scored on the same test split (default: A's base model).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparisons as JSON.")] = False,
) -> None:
    """Which run is better on the same test examples, and how sure: McNemar's exact test for accuracy
    and exact match, paired bootstrap intervals for every metric; against the base model too where a
    run scored it (train.score_base_model)."""
    from lorakit.evaluation.paired import compare_runs, format_table

    comparisons = compare_runs(run_a, run_b)
    if not comparisons:
        raise LorakitError(
            f"'{run_a}' scored no base model to compare with (train.score_base_model); give a second run"
        )
    if as_json:
        typer.echo(json.dumps([c.to_dict() for c in comparisons], indent=2))
    else:
        typer.echo(format_table(comparisons))


@app.command()
def predict(
    path: Annotated[Path, typer.Argument(help="Run directory or adapter directory.")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Texts to classify, or image files / http(s) URLs for an image adapter."),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="A file with one input per line.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Show the k most likely labels.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per input.")] = False,
) -> None:
    """Predict labels (with probabilities) for inputs (texts,
    or image files / URLs) given as arguments or in a file."""
    from lorakit.serving.prediction import Predictor

    _setup_logging()
    items = list(inputs or []) + _lines(file)
    predictor = Predictor.from_adapter(path)
    for r in predictor(items, top_k=top_k):
        typer.echo(json.dumps(r, ensure_ascii=False) if as_json else predictor.loaded.task.predict_line(r))


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="Run directory or adapter directory of a causal-lm adapter.")],
    prompts: Annotated[
        list[str] | None, typer.Argument(help="User messages; the chat template is applied.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A file with one prompt per line.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Longest answer in tokens.")
    ] = 128,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0.01, help="Sampling temperature (with --sample).")] = 0.7,
    top_p: Annotated[
        float, typer.Option("--top-p", min=0.01, max=1.0, help="Nucleus sampling mass (with --sample).")
    ] = 0.9,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    system: Annotated[
        str | None, typer.Option(help="System message (default: the one the adapter was trained with).")
    ] = None,
    no_adapter: Annotated[
        bool, typer.Option("--no-adapter", help="Answer with the base model alone (for comparison).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
) -> None:
    """Answer prompts with a causal-lm adapter; generation stops at the end-of-turn token."""
    from lorakit.serving.prediction import generate as run_generate

    _setup_logging()
    items = list(prompts or []) + _lines(file)
    for r in run_generate(
        path,
        items,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        system=system,
        use_adapter=not no_adapter,
    ):
        typer.echo(json.dumps(r, ensure_ascii=False) if as_json else r["output"])


@app.command(
    help=(
        "Merge an adapter into its base model (Hugging Face folder, ONNX, GGUF), and prove it: "
        "same logits before and after."
    )
)
def export(
    path: Annotated[Path, typer.Argument(help="Run directory or adapter directory.")],
    merge: Annotated[
        Path | None,
        typer.Option(
            "--merge",
            help="Write the base model with the adapter merged in (Hugging Face format) to this folder.",
            metavar="OUT_DIR",
        ),
    ] = None,
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx",
            help="Also write model.onnx into OUT_DIR (classification tasks), checked with onnxruntime.",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT_DIR.")] = False,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model", help="Use this copy of the base model (it must have the recorded hash)."
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Largest accepted |unmerged - merged| logit difference.")
    ] = 1e-4,
    gguf: Annotated[
        Path | None,
        typer.Option(
            "--gguf",
            help="Write the merged model as GGUF (llama.cpp, Ollama) to this folder, with a "
            "llama.cpp LoRA file and a Modelfile (Llama-family causal LMs).",
            metavar="OUT_DIR",
        ),
    ] = None,
    gguf_type: Annotated[
        str,
        typer.Option(
            "--gguf-type",
            help="GGUF weights: f16 (checked against the adapter's logits) or q8_0 (difference printed).",
        ),
    ] = "f16",
    no_lora: Annotated[
        bool, typer.Option("--no-lora", help="With --gguf: skip the llama.cpp LoRA adapter file.")
    ] = False,
    score_test: Annotated[
        bool,
        typer.Option(
            "--score-test",
            help="With --gguf: also answer the run's test split with the adapter and with the file "
            "read back, and print both exact matches (minutes: it generates twice).",
        ),
    ] = False,
    vllm: Annotated[
        Path | None,
        typer.Option(
            "--vllm",
            help="Lay out the base model and the adapter for `vllm serve` in this folder, after "
            "checking what vLLM refuses (causal LMs).",
            metavar="OUT_DIR",
        ),
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            "--max-lora-rank",
            help="With --vllm: the server's --max-lora-rank (default: the smallest vLLM accepts "
            "for the adapter).",
        ),
    ] = None,
) -> None:
    from lorakit.errors import LorakitError as _Err

    _setup_logging()
    if merge is None and gguf is None and vllm is None:
        raise _Err(
            "export needs --merge OUT_DIR (Hugging Face folder; --onnx adds model.onnx to it), "
            "--gguf OUT_DIR (llama.cpp / Ollama) and/or --vllm OUT_DIR"
        )
    if score_test and gguf is None:
        raise _Err("--score-test scores the GGUF file written by --gguf OUT_DIR; pass --gguf too")
    if onnx and merge is None:
        raise _Err("--onnx adds model.onnx to the --merge OUT_DIR folder; pass --merge too")
    if merge is not None:
        _export_merged(
            path, merge, onnx=onnx, overwrite=overwrite, base_model=base_model, tolerance=tolerance
        )
    if gguf is not None:
        _export_gguf(
            path,
            gguf,
            gguf_type=gguf_type,
            overwrite=overwrite,
            base_model=base_model,
            lora=not no_lora,
            score_test=score_test,
        )
    if vllm is not None:
        _export_vllm(path, vllm, max_lora_rank=max_lora_rank, overwrite=overwrite)


def _export_merged(path: Path, merge: Path, **options: object) -> None:
    from lorakit.export.merge import export as run_export

    r = run_export(path, merge, **options)  # type: ignore[arg-type]
    typer.echo(f"merged model: {r.out_dir}")
    typer.echo(
        f"  largest |unmerged - merged| logit difference on {r.checked} inputs: {r.merged_diff:.3g} "
        f"in float64 (tolerance {r.tolerance:g}), {r.merged_diff_fp32:.3g} in float32 (float32 "
        f"arithmetic alone: {r.fp32_noise:.3g})"
    )
    if r.onnx_path:
        typer.echo(f"onnx: {r.onnx_path}")
        typer.echo(
            f"  largest |unmerged - onnxruntime| logit difference: {r.onnx_diff:.3g} (tolerance "
            f"{r.tolerance:g})"
        )


def _export_gguf(path: Path, out: Path, **options: object) -> None:
    from lorakit.export.gguf import export_gguf

    r = export_gguf(path, out, **options)  # type: ignore[arg-type]
    bound = (
        f"tolerance {r.tolerance:g} x that" if r.tolerance is not None else "quantised: measured, not bounded"
    )
    typer.echo(f"gguf model: {r.model_file}")
    typer.echo(
        f"  largest |unmerged - GGUF {r.gguf_type}| logit difference on {r.checked} inputs, "
        f"read back by transformers: {r.logit_diff:.3g} (largest |logit| {r.logit_scale:.3g}; "
        f"{bound}); same next token at {100 * r.top1_agreement:.1f}% of positions; "
        "tokenizer: same ids"
    )
    if r.scored:
        sc = r.scored
        typer.echo(
            f"  exact match on the run's {sc['examples']} test examples (greedy, float32): adapter "
            f"{100 * sc['adapter']:.2f}%, GGUF {r.gguf_type} {100 * sc['gguf']:.2f}% "
            f"({100 * (sc['gguf'] - sc['adapter']):+.2f} points); identical answers "
            f"{100 * sc['identical_answers']:.1f}%"
        )
    if r.lora_file:
        typer.echo(
            f"gguf lora:  {r.lora_file} (llama.cpp --lora on the base model's GGUF; "
            f"largest |delta W read back - adapter's| {r.lora_diff:.3g})"
        )
    else:
        typer.echo(f"gguf lora:  not written: {r.lora_skipped}")
    typer.echo(f"ollama:     ollama create NAME -f {r.out_dir / 'Modelfile'}")


def _export_vllm(path: Path, out: Path, **options: object) -> None:
    import shlex

    from lorakit.export.vllm import export_vllm

    v = export_vllm([path], out, **options)  # type: ignore[arg-type]
    typer.echo(f"vllm: base {v.base_dir}, adapter(s) {', '.join(f'{n}={p}' for n, p in v.adapters.items())}")
    typer.echo(f"  serve (vLLM's own environment: make vllm-env): {shlex.join(v.command)}")


@app.command(
    "import",
    help=(
        "Make a peft adapter trained elsewhere a lorakit adapter: task, labels, base and its hash, "
        "checked against the base."
    ),
)
def import_(
    path: Annotated[
        Path,
        typer.Argument(
            help="A LoRA adapter folder written by peft (adapter_config.json + adapter_model.safetensors)."
        ),
    ],
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="text-classification, image-classification or causal-lm (default: from peft's task_type).",
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Class names in class-id order, comma-separated (default: the base config's id2label).",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="The base model (default: base_model_name_or_path of adapter_config.json)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Write the lorakit adapter to this new folder (default: add lorakit.json to PATH)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", min=8, help="Tokens per input at prediction time (text tasks)."),
    ] = None,
) -> None:
    from lorakit.adapters.importing import import_adapter

    _setup_logging()
    names = [n.strip() for n in labels.split(",") if n.strip()] if labels else None
    r = import_adapter(
        path, task=task, labels=names, base_model=base, out=out, overwrite=overwrite, max_length=max_length
    )
    typer.echo(f"imported a {r.task} adapter on {r.base_model}: {r.adapter_dir}")
    if r.labels:
        typer.echo(f"  labels ({r.labels_from}): {', '.join(r.labels)}")
    from lorakit.tasks import get_task

    typer.echo(
        "  checked: every saved tensor loads into the base; next: lorakit "
        f"{get_task(r.task).cli_command} {r.adapter_dir} ..."
    )


RegistryOpt = Annotated[
    Path | None,
    typer.Option(
        "--registry",
        envvar="LORAKIT_REGISTRY",
        help="Registry folder (default ~/.local/share/lorakit/registry).",
    ),
]


@app.command()
def publish(
    path: Annotated[Path, typer.Argument(help="Run directory or adapter directory.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Store the next version of NAME in the local registry.")
    ] = None,
    hub: Annotated[
        str | None,
        typer.Option(
            "--hub",
            help="Also push to this Hugging Face Hub repo (owner/name); token from HF_TOKEN.",
            metavar="REPO_ID",
        ),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo private.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Publish an adapter: an immutable, hashed version in the local registry, and/or a push to the Hub."""
    from lorakit.adapters.folder import find_adapter_dir
    from lorakit.adapters.registry import Registry, check_name
    from lorakit.errors import LorakitError as _Err

    _setup_logging()
    if not name and not hub:
        raise _Err("publish needs --name NAME (local registry) and/or --hub REPO_ID (Hugging Face Hub)")
    if name:
        check_name(name)
    find_adapter_dir(path)  # a complete adapter, before anything is stored or pushed
    if name:
        v, new = Registry(registry).publish(path, name)
        state = "published" if new else "unchanged, already published as"
        typer.echo(f"{state} {v.ref}  {v.content_hash[:23]}…  {v.metric}  ({v.path})")
    if hub:
        from lorakit.adapters.hub import push_to_hub

        typer.echo(f"pushed to the Hub: {push_to_hub(path, hub, private=private)}")


registry_app = typer.Typer(
    help="The local adapter registry: list, show, pull, delete versions.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")


@registry_app.command("list")
def registry_list(
    name: Annotated[str | None, typer.Argument(help="Only the versions of this adapter.")] = None,
    registry: RegistryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per version.")] = False,
) -> None:
    """Table of published versions with task, base model and headline metric."""
    from lorakit.adapters.registry import Registry

    versions = Registry(registry).list(name)
    if as_json:
        for v in versions:
            typer.echo(json.dumps(v.to_dict() | {"files": None}))
        return
    if not versions:
        typer.echo("no adapters published yet (lorakit publish ADAPTER_DIR --name NAME)")
        return
    rows = [("NAME", "VERSION", "TASK", "BASE MODEL", "METRIC", "SIZE", "CREATED", "HASH")]
    for v in versions:
        base = v.base_model if len(v.base_model) <= 40 else "…" + v.base_model[-39:]
        rows.append(
            (
                v.name,
                str(v.version),
                v.task,
                base,
                v.metric,
                f"{v.size / 1e6:.1f} MB",
                v.created_at.replace("+00:00", "Z"),
                v.content_hash[7:19],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@registry_app.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME (latest) or NAME:VERSION.")],
    registry: RegistryOpt = None,
) -> None:
    """Everything the index holds about a version (JSON), plus its model card location."""
    from lorakit.adapters.registry import Registry

    v = Registry(registry).get(ref)
    typer.echo(json.dumps(v.to_dict(), indent=2))


@registry_app.command("pull")
def registry_pull(
    ref: Annotated[str, typer.Argument(help="NAME (latest) or NAME:VERSION.")],
    to: Annotated[
        Path | None,
        typer.Option(
            "--to", help="Copy the verified adapter to this folder (default: print the stored folder)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --to folder.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Verify a version's files against their published hashes and hand out the adapter folder."""
    from lorakit.adapters.registry import Registry

    typer.echo(str(Registry(registry).pull(ref, to, overwrite=overwrite)))


@registry_app.command("delete")
def registry_delete(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION, or NAME with --all.")],
    all_versions: Annotated[bool, typer.Option("--all", help="Delete every version of NAME.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Delete a version (or all versions) from the index and from disk."""
    from lorakit.adapters.registry import Registry

    for v in Registry(registry).delete(ref, all_versions=all_versions):
        typer.echo(f"deleted {v.ref}")


@app.command()
def serve(
    adapters: Annotated[
        list[str],
        typer.Argument(
            help="Adapters: NAME=PATH, a run / adapter folder, or a registry name[:version]. "
            "The first fixes the base model."
        ),
    ],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    registry: RegistryOpt = None,
    on_demand: Annotated[
        bool,
        typer.Option(
            "--on-demand/--no-on-demand", help="Load registry adapters named by requests (needs a registry)."
        ),
    ] = True,
    admin_token: Annotated[
        str | None,
        typer.Option(
            "--admin-token",
            envvar="LORAKIT_ADMIN_TOKEN",
            help="Bearer token for POST/DELETE /v1/adapters (unset: admin routes off).",
        ),
    ] = None,
    max_adapters: Annotated[
        int, typer.Option(min=1, help="Adapters kept in memory (least recently used unloaded).")
    ] = 64,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 32,
    window_ms: Annotated[float, typer.Option(min=0.0, help="Batching window in milliseconds.")] = 5.0,
    no_merge: Annotated[
        bool, typer.Option("--no-merge", help="Never merge a single adapter into the base weights.")
    ] = False,
    peft_mixed: Annotated[
        bool,
        typer.Option(
            "--peft-mixed",
            help="Run mixed-adapter batches with peft's per-adapter loop instead of gathered "
            "matmuls (comparison).",
        ),
    ] = False,
    adapter_dtype: Annotated[
        str,
        typer.Option(
            "--adapter-dtype", help="float32, or float16 / bfloat16 to hold adapters in half the memory."
        ),
    ] = "float32",
    allow_base: Annotated[
        bool,
        typer.Option(
            "--allow-base",
            help="Let requests name 'base' to run the bare base model (comparisons, benchmarks).",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request may wait for its result.")
    ] = 60.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Serve adapters over HTTP: /v1/predict, /v1/chat/completions, /v1/adapters, /healthz, /metrics."""
    try:
        import uvicorn

        from lorakit.serving import Engine, create_app
    except ImportError as exc:
        raise LorakitError(
            f"serve needs the server packages ({exc.name} is missing): pip install 'lorakit[serve]'"
        ) from None

    _setup_logging()
    from lorakit.adapters.registry import default_root
    from lorakit.training import release_freed_memory

    release_freed_memory(arenas=2)  # a long-lived server: keep resident memory from creeping
    reg = registry or (default_root() if default_root().joinpath("index.sqlite").is_file() else None)
    engine = Engine(
        adapters,
        registry=reg,
        on_demand=on_demand,
        max_adapters=max_adapters,
        max_batch=max_batch,
        window_ms=window_ms,
        merge_single=not no_merge,
        allow_base=allow_base,
        gathered=not peft_mixed,
        adapter_dtype=adapter_dtype,
        device=device,
    )
    typer.echo(
        f"serving {len(engine.known)} {engine.task.name} adapter(s) on {engine.base_name} at "
        f"http://{host}:{port} (docs: /docs)",
        err=True,
    )
    _stop_cleanly_on_sigterm()
    uvicorn.run(
        create_app(engine, admin_token=admin_token, request_timeout=timeout),
        host=host,
        port=port,
        log_level="warning",
    )


@app.command()
def ui(
    workspace: Annotated[
        Path,
        typer.Option(
            "--workspace", help="Folder with runs/, configs/ and registry/ (default: the current folder)."
        ),
    ] = Path("."),
    host: Annotated[
        str, typer.Option(help="Interface to listen on; anything but the loopback needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="LORAKIT_UI_TOKEN",
            help="Token every request must carry (open the UI with ?token=...).",
        ),
    ] = None,
    max_runs: Annotated[
        int | None,
        typer.Option(
            "--max-runs",
            min=1,
            help="Trainings at once; the others wait in a queue (default: 1 on CPU, 1 per GPU).",
        ),
    ] = None,
) -> None:
    """A local web app: runs table, new-run form, live run pages, compare, try it, registry."""
    try:
        import uvicorn

        from lorakit.ui import create_app
        from lorakit.ui.security import is_loopback
    except ImportError as exc:
        raise LorakitError(
            f"ui needs the web packages ({exc.name} is missing): pip install 'lorakit[ui]'"
        ) from None

    _setup_logging()
    if not is_loopback(host) and not token:
        raise LorakitError(
            f"--host {host} makes the UI reachable from other machines; give a --token (or "
            "LORAKIT_UI_TOKEN), or use --host 127.0.0.1"
        )
    if not workspace.is_dir():
        raise LorakitError(f"--workspace: '{workspace}' is not a folder")
    os.chdir(
        workspace
    )  # relative paths in run configs (data, base model) are read from the workspace, as train read them
    suffix = f"/?token={token}" if token else "/"
    typer.echo(
        f"lorakit ui on http://{'localhost' if is_loopback(host) else host}:{port}{suffix} "
        f"(workspace {Path.cwd()})",
        err=True,
    )
    uvicorn.run(
        create_app(Path.cwd(), token=token, loopback=is_loopback(host), max_runs=max_runs),
        host=host,
        port=port,
        log_level="warning",
    )


@app.command()
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What a bug report needs: versions, Python, OS, CPU (bf16 / AMX) or GPUs, threads, what
    `mixed_precision: auto` picks here, installed extras, cache and registry folders."""
    from lorakit.training.environment import environment_report, report_lines

    report = environment_report()
    typer.echo(json.dumps(report, indent=2) if as_json else "\n".join(report_lines(report)))


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM ends `serve` with exit code 0 once uvicorn has answered the requests in flight.

    uvicorn catches SIGTERM, stops accepting connections, finishes the open requests, then raises the
    signal again for the handler that was there before it: with Python's default, the process dies of
    it (exit -15). This handler turns that second delivery into a normal end.
    """
    import signal

    def _exit(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="lorakit")
    except LorakitError as exc:
        typer.echo("error: " + " ".join(str(exc).split()), err=True)  # always one line
        sys.exit(exc.exit_code)
    except OSError as exc:  # a full disk anywhere else (logs, caches): still one line
        from lorakit.files.diskspace import is_no_space

        if not is_no_space(exc):
            raise
        typer.echo(
            f"error: no space left on the device ({exc.filename or 'while writing'}); finished "
            "artifacts are intact: free some space and run again",
            err=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing half-written was left in place", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
