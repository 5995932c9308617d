"""`lorakit check`: validate a config and dry-run everything before training starts.

Reads the data (sizes, columns, label distribution), loads the model, resolves the LoRA targets
and counts parameters, without writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config.loading import load_config
from lorakit.config.schema import METHOD_NAMES, RunConfig
from lorakit.models import modeling
from lorakit.tasks import get_task


@dataclass
class Plan:
    """What a run would do."""

    config: RunConfig
    model_path: str
    model_type: str
    sizes: dict[str, int]
    columns: list[str]
    label_counts: dict[str, dict[str, int]]
    labels: list[str]
    target_modules: list[str] | str
    modules_to_save: list[str]
    trainable: int
    total: int
    device: str
    precision: str
    steps: int
    stats: dict[str, Any] = field(default_factory=dict)
    task_lines: list[str] = field(default_factory=list)  # what the task says about its data (tokens, images)

    def lines(self) -> list[str]:
        c = self.config
        out = [
            f"config      ok ({c.task})",
            f"data        {c.data.train}" + (f" where {c.data.where}" if c.data.where else ""),
            "  splits    " + ", ".join(f"{k} {v:,}" for k, v in self.sizes.items()),
            "  columns   " + ", ".join(self.columns),
        ]
        if self.labels:
            out.append(
                f"  labels    {len(self.labels)}: "
                + ", ".join(self.labels[:20])
                + (" …" if len(self.labels) > 20 else "")
            )
            for split, counts in self.label_counts.items():
                out.append(f"  {split:<9} " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        out += self.task_lines
        out += [f"  warning   {w}" for w in self.stats.get("warnings", [])]
        out += [
            f"model       {c.model.name_or_path} ({self.model_type})",
            f"{METHOD_NAMES[c.lora.method]:<12}r={c.lora.r} alpha={c.lora.alpha}"
            + (f" dropout={c.lora.dropout}" if c.lora.method == "lora" else "")
            + (" effective-conv2d" if c.lora.effective_conv2d else "")
            + (f" rank_pattern={c.lora.rank_pattern}" if c.lora.rank_pattern else "")
            + (" rsLoRA" if c.lora.use_rslora else "")
            + (" DoRA" if c.lora.use_dora else ""),
            f"  targets   {self.target_modules}",
            f"  trained   {some(self.modules_to_save)} (fully, saved with the adapter)",
            f"  params    {self.trainable:,} trainable / {self.total:,} total "
            f"({100 * self.trainable / max(1, self.total):.2f}%)",
            f"train       {self.steps:,} optimizer steps at lr {c.train.learning_rate:g} on "
            f"{self.device} in {self.precision}; output to {c.output.dir}",
        ]
        return out


def some(names: list[str], shown: int = 4) -> str:
    """A list of names for one line: all of them when few, else the count and the first ``shown``."""
    if len(names) <= shown + 1:
        return ", ".join(names) if names else "nothing"
    return f"{len(names)} modules: {', '.join(names[:shown])}, …"


def check(config: RunConfig | str | Path, *, overrides: list[str] | None = None) -> Plan:
    """Validate ``config`` and resolve data, model and LoRA targets without training or writing.

    Raises:
        LorakitError: The first problem that would stop the run (config problems are all listed).
    """
    from lorakit.adapters.build import build_model, open_base, resolve_config
    from lorakit.training import optimizer_steps

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    task = get_task(cfg.task)
    device = modeling.pick_device(cfg.train.device)
    cfg = resolve_config(cfg, task, device)
    precision = modeling.precision_name(modeling.pick_precision(cfg.train.mixed_precision, device))
    base = open_base(task, cfg.model)
    data = task.prepare(cfg, base.processor)
    model = build_model(task, cfg, base, data.label_space)
    trainable, total = modeling.count_parameters(model)
    lc = model.peft_config["default"]
    _, steps = optimizer_steps(len(data.splits["train"]), cfg.train)
    return Plan(
        config=cfg,
        model_path=base.path,
        model_type=model.get_base_model().config.model_type,
        sizes={k: len(v) for k, v in data.splits.items()},
        columns=list(data.stats.get("columns", [])),
        label_counts=data.stats.get("label_counts", {}),
        labels=list(data.label_space.labels) if data.label_space else [],
        target_modules=sorted(lc.target_modules)
        if not isinstance(lc.target_modules, str)
        else lc.target_modules,
        modules_to_save=sorted(set(lc.modules_to_save or [])),
        trainable=trainable,
        total=total,
        device=str(device),
        precision=precision,
        steps=steps,
        stats=data.stats,
        task_lines=task.plan_lines(cfg, data.stats),
    )
