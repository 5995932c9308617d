"""`lorakit train`: one entry point, read top to bottom: setup -> train -> cleanup.

    config ─► data (task.prepare) ─► base model + LoRA ─► AdamW + schedule ─► loop
      each epoch (or every N steps): evaluate on validation, keep the best adapter
      end: reload the best weights, score the test split, write metrics, report and model card
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lorakit import artifacts, checkpoint, distributed, modeling, tracking
from lorakit.batching import train_batches
from lorakit.card import model_card
from lorakit.config import RunConfig, TrainConfig, load_config, load_yaml
from lorakit.engine import autocast, take, to_device
from lorakit.errors import LorakitError, RunDirError
from lorakit.events import Callback
from lorakit.tasks import get_task

log = logging.getLogger("lorakit")


class TrainingError(LorakitError):
    """Training cannot go on (e.g. the loss became NaN); the last good adapter is kept."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    adapter_dir: Path
    best_metric: str
    best_value: float
    validation: dict[str, Any]
    test: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    main: bool = True  # False on the ranks > 0 of a data-parallel run, which write nothing


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _param_groups(model: torch.nn.Module, cfg: RunConfig, head_modules: list[str]) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases / norms; optional own learning rates for the head and (LoRA+) the B matrices."""
    t = cfg.train
    groups: dict[tuple[bool, bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower()
        is_head = any(f".{h}." in f".{name}" for h in head_modules) and "lora_" not in name
        is_b = ".lora_B." in name or ".lora_embedding_B." in name
        groups.setdefault((no_decay, is_head, is_b), []).append(p)
    out = []
    for (no_decay, is_head, is_b), params in groups.items():
        lr = t.head_learning_rate if (is_head and t.head_learning_rate) else t.learning_rate
        if is_b and t.lora_plus_ratio:
            lr *= t.lora_plus_ratio
        out.append({"params": params, "weight_decay": 0.0 if no_decay else t.weight_decay, "lr": lr})
    return out


def train(config: RunConfig | str | Path, *, overrides: list[str] | None = None, overwrite: bool | None = None, resume: bool = False, progress: bool = True,
          callbacks: list[Callback] | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter as the run config says.

    Args:
        config: A :class:`RunConfig` or the path of a YAML config.
        overrides: ``section.key=value`` items applied on top of a YAML config.
        overwrite: Replace an existing run directory (defaults to ``output.overwrite``).
        resume: Continue from the newest checkpoint in the run directory (weights, optimizer,
            schedule, RNG and data position), giving the same result as an uninterrupted run.
            Without a checkpoint the run starts from the beginning.
        progress: Show progress bars.
        callbacks: Listeners to the run's events (:class:`~lorakit.events.Callback`), besides the
            trackers ``output.report_to`` names; rank 0 calls them.

    Under ``torchrun`` / ``accelerate launch`` every process calls this: training is data-parallel
    (``train.batch_size`` per process), evaluation is shared out and gathered, and only rank 0
    writes (see :mod:`lorakit.distributed`).

    Returns:
        The run's :class:`TrainResult`; the adapter is in ``<output.dir>/adapter``.

    Raises:
        LorakitError: Any problem with the config, data, model or output folder (nothing is written).
    """
    # ============================================================================================
    # setup
    # ============================================================================================
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    t = cfg.train
    task = get_task(cfg.task)
    t0 = time.perf_counter()
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.release_memory:
        release_freed_memory()
    world, device = distributed.setup(t.device)
    level = log.level
    if not world.main:
        log.setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        return _train(cfg, task, world, device or modeling.pick_device(t.device), t0, overwrite=overwrite, resume=resume, progress=progress and world.main, callbacks=callbacks or [])
    finally:
        log.setLevel(level)
        distributed.shutdown()


MMAP_THRESHOLD = 8 << 20


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap threshold so that large freed tensors return to the system.

    glibc raises the threshold each time a large block is freed (up to 32 MiB), after which tensors
    are carved from the heap; batches of changing shapes then fragment it and the resident memory
    grows run-long. A fixed threshold keeps large tensors in their own mappings. Returns whether it
    was set (only on glibc).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _train(cfg: RunConfig, task: Any, world: distributed.World, device: torch.device, t0: float, *, overwrite: bool | None, resume: bool, progress: bool,
           callbacks: list[Callback]) -> TrainResult:
    t = cfg.train
    amp = modeling.pick_precision(t.mixed_precision, device)

    # Everything that can fail on user input is checked before the run directory is touched.
    if world.sharded and cfg.lora.init in ("pissa", "olora"):
        raise LorakitError(f"lora.init: {cfg.lora.init} is not supported with FSDP (it rewrites the sharded base weights); use lora.init: default, or launch without the FSDP config")
    if world.sharded and cfg.model.quantization != "none":
        raise LorakitError("model.quantization: a quantized base cannot be sharded with FSDP; remove model.quantization, or launch without the FSDP config (DDP)")
    # Trackers first: one that cannot be reached is an error before anything is loaded or written.
    hooks: list[Callback] = []
    if world.main:
        trackers = tracking.make_trackers(cfg.output.trackers, experiment=cfg.output.experiment, run_name=Path(cfg.output.dir).name)
        hooks = [tracking.HistoryFile(), *trackers, *callbacks]
    model_path = modeling.resolve_model_path(cfg.model)
    processor = task.load_processor(cfg.model, model_path)
    data = task.prepare(cfg, processor)
    sizes = {k: len(v) for k, v in data.splits.items()}
    if world.distributed:  # every rank read and split the data itself: they must agree
        seen = distributed.gather((data.label_space.labels if data.label_space else None, sizes), world)
        if any(x != seen[0] for x in seen):
            raise LorakitError(f"the processes prepared different data ({seen[0]} on rank 0, {next(x for x in seen if x != seen[0])} elsewhere); give every node the same data files")
    set_seed(t.seed)
    base, new_modules = task.load_model(cfg.model, model_path, data.label_space, cfg.data)
    cfg = modeling.with_learning_rate(cfg, base.config.model_type)  # unset: the architecture's default, saved as resolved
    t = cfg.train
    model = task.prepare_model(modeling.apply_lora(base, cfg.lora, task_type=task.peft_task_type, new_modules=new_modules))
    trainable, total = modeling.count_parameters(model)
    lora_cfg = model.peft_config["default"]
    # PiSSA / OLoRA move part of each base weight into the adapter: the starting adapter is kept so the
    # saved one can be converted to a plain LoRA adapter (rank 2r) that applies to the original base model.
    initial = tempfile.TemporaryDirectory(prefix="lorakit-initial-") if cfg.lora.init in ("pissa", "olora") and world.main else None
    if initial is not None:
        model.save_pretrained(str(Path(initial.name) / "initial"), safe_serialization=True)
    metric_name = t.metric_for_best or task.default_metric
    greater = t.greater_is_better if t.greater_is_better is not None else "loss" not in metric_name

    run = Path(cfg.output.dir)
    state = checkpoint.load_latest(run) if resume else None
    distributed.barrier(world)  # every rank has read the checkpoint before rank 0 may clear the folder

    def prepare_run() -> Path:
        if state is not None:
            _check_resumable(run, cfg)
            if len(_rank_rngs(state)) != world.size:
                raise RunDirError(f"--resume: the run in '{run}' was trained on {len(_rank_rngs(state))} process(es), not {world.size}; resume with the same number of processes (the batches depend on it)")
            return run
        if resume and (run / "metrics.json").is_file():
            raise RunDirError(f"--resume: the run in '{run}' already finished; nothing to resume (use --overwrite to train again)")
        # A fresh start; with --resume and no checkpoint yet, whatever a killed run left is replaced.
        fresh = artifacts.prepare_run_dir(run, overwrite=resume or (overwrite if overwrite is not None else cfg.output.overwrite))
        artifacts.clear_run_dir(fresh)
        artifacts.write_text_atomic(fresh / "config.yaml", yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
        return fresh

    run = distributed.on_main(prepare_run, world) or run
    log_file = None
    if world.main:
        log_file = logging.FileHandler(run / "train.log", encoding="utf-8")
        log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log_file.setLevel(logging.DEBUG)
        log.addHandler(log_file)
        log.setLevel(logging.DEBUG)  # the file gets every training-loss line; the console handler filters
    for note in data.stats.get("warnings", []):
        log.warning(note)
    log.info("data: %s; labels: %s", sizes, ", ".join(data.label_space.labels) if data.label_space else "-")
    log.info("model: %s (%s) with LoRA r=%d on %s; trainable %s / %s params (%.2f%%)", cfg.model.name_or_path,
             base.config.model_type, cfg.lora.r, sorted(lora_cfg.target_modules) if not isinstance(lora_cfg.target_modules, str) else lora_cfg.target_modules,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    precision = modeling.precision_name(amp)
    log.info("device: %s, precision: %s, threads: %d%s", device, precision, torch.get_num_threads(),
             f", {world.size} processes (batch {t.batch_size} per process, {t.batch_size * world.size * t.gradient_accumulation_steps} per step)" if world.distributed else "")

    writer = None
    try:
        info = {"task": cfg.task, "base_model": cfg.model.name_or_path, "model_type": base.config.model_type, "data_sizes": sizes, "trainable_params": trainable, "total_params": total}
        for cb in hooks:
            cb.on_start(run, cfg.to_yaml_dict(), info)
        if "tensorboard" in cfg.output.trackers and world.main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run / "tensorboard"))

        model.to(device)
        model.train()
        forward = distributed.wrap(model, world, device)  # the training forward / backward; DDP or FSDP when launched
        train_collate = task.collate(processor, cfg.data, train=True)
        train_ds = data.splits["train"]
        lengths = train_ds["length"] if "length" in train_ds.column_names else [1] * len(train_ds)
        steps_per_epoch, total_steps = optimizer_steps(len(train_ds), t, world.size)
        head_modules = sorted(set(lora_cfg.modules_to_save or []))
        optimizer = torch.optim.AdamW(_param_groups(model, cfg, head_modules), lr=t.learning_rate, betas=t.adam_betas)
        from transformers import get_scheduler

        scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * total_steps), num_training_steps=total_steps)
        if world.sharded:  # inf checks agree across the ranks' gradient shards
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler: Any = ShardedGradScaler(device.type, enabled=amp == torch.float16)
        else:
            scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        if state is not None:
            _restore_weights(model, state["trainable"])
            distributed.load_optimizer_state(model, optimizer, state["optimizer"], world)
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])

        def base_metadata() -> dict[str, Any]:
            return {
                "format": "lorakit-adapter/1",
                "task": cfg.task,
                "base_model": {
                    "name_or_path": cfg.model.name_or_path,
                    "resolved": model_path,
                    "revision": cfg.model.revision,
                    "model_type": base.config.model_type,
                    "fingerprint": fingerprint,
                },
                "label_space": data.label_space.to_dict() if data.label_space else None,
                "data": {"sizes": sizes, "stats": data.stats},
                "lora": {
                    "r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                    "target_modules": sorted(lora_cfg.target_modules) if not isinstance(lora_cfg.target_modules, str) else lora_cfg.target_modules,
                    "modules_to_save": head_modules, "layers": lora_cfg.layers_to_transform, "use_rslora": cfg.lora.use_rslora, "use_dora": cfg.lora.use_dora,
                },
                "parameters": {"trainable": trainable, "total": total},
                "config": cfg.to_yaml_dict(),
                "versions": artifacts.library_versions(),
                "created_at": artifacts.now_iso(),
            }

        fingerprint = modeling.model_fingerprint(model_path, base)

        # ============================================================================================
        # train
        # ============================================================================================
        history: list[dict[str, Any]] = []
        best_value: float | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_eval: dict[str, Any] = {}
        best_at: dict[str, float] = {}
        evals_without_gain = 0
        step = 0
        epoch, start_micro = 0, 0
        running_loss, running_n = 0.0, 0
        stop = False
        if state is not None:
            history, best_value, best_state, best_eval, best_at = state["history"], state["best_value"], state["best_state"], state["best_eval"], state["best_at"]
            evals_without_gain, stop, step, epoch, start_micro = state["evals_without_gain"], state["stop"], state["step"], state["epoch"], state["micro"]
            running_loss, running_n = state["running_loss"], state["running_n"]
            checkpoint.set_rng_state(_rank_rngs(state)[world.rank])  # last: everything above may have drawn random numbers
            log.info("resumed from checkpoint at step %d (epoch %d, batch %d)", step, epoch, start_micro)

        def save_checkpoint(at_epoch: int, next_micro: int) -> None:
            rngs = distributed.gather(checkpoint.rng_state(), world)  # each rank draws its own dropout masks
            weights, optim = _adapter_state(model), distributed.optimizer_state(model, optimizer, world)  # collectives under FSDP
            if not world.main:
                return
            checkpoint.save(run, step, {
                "step": step, "epoch": at_epoch, "micro": next_micro, "stop": stop,
                "trainable": weights,
                "optimizer": optim, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng_ranks": rngs,
                "history": history, "best_value": best_value, "best_state": best_state,
                "best_eval": best_eval, "best_at": best_at, "evals_without_gain": evals_without_gain,
                "running_loss": running_loss, "running_n": running_n,
                "run_seconds": time.perf_counter() - t0 - eval_time[0] + clock_offset,
            })

        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)

        def eval_bar(split: str) -> Any:
            return tqdm(total=len(data.splits[split]), desc=split, unit="ex", disable=not progress, leave=False, dynamic_ncols=True)

        def score(split: str) -> dict[str, Any]:
            distributed.sync_buffers(model, world)
            return task.evaluate(model, data.splits[split], processor, cfg.data, data.label_space, batch_size=t.eval_batch_size or t.batch_size * (4 if device.type == "cuda" else 1), device=device, amp=amp,
                                 progress=eval_bar(split), generation_samples=t.generation_samples, max_new_tokens=t.max_new_tokens)

        eval_time = [0.0]  # seconds spent evaluating in this process
        clock_offset = float(state.get("run_seconds", 0.0)) if state else 0.0  # training time before a resume

        def run_eval(epoch: float) -> None:
            nonlocal best_value, best_state, best_eval, best_at, evals_without_gain, stop
            started = time.perf_counter()
            metrics = score("validation")
            # seconds: time since the run started, evaluations left out (when the run reached this point)
            elapsed = started - t0 - eval_time[0] + clock_offset
            eval_time[0] += time.perf_counter() - started
            if metric_name not in metrics:
                raise TrainingError(f"train.metric_for_best: '{metric_name}' is not computed for {cfg.task}; choose one of {', '.join(scalars(metrics))}")
            row = {"step": step, "epoch": round(epoch, 4), "split": "validation", "seconds": round(elapsed, 2), **scalars(metrics)}
            history.append(row)
            for cb in hooks:
                cb.on_eval(row)
            if writer:
                for k, v in scalars(metrics).items():
                    writer.add_scalar(f"validation/{k}", v, step)
            value = float(metrics[metric_name])
            improved = best_value is None or (value > best_value if greater else value < best_value)
            log.info("eval step %d (epoch %.2f): %s%s", step, epoch, ", ".join(f"{k}={v:.4f}" for k, v in scalars(metrics).items()), "  (best)" if improved else "")
            if improved:
                best_value, best_eval, evals_without_gain, best_at = value, metrics, 0, {"step": step, "epoch": epoch}
                # Kept in memory and in checkpoints; adapter/ is written once, when the run is complete,
                # so an interrupted run never leaves something that looks like a finished adapter.
                best_state = _adapter_state(model)
            else:
                evals_without_gain += 1
                if t.early_stopping_patience and evals_without_gain >= t.early_stopping_patience:
                    log.info("early stopping: no gain in %s for %d evaluations", metric_name, evals_without_gain)
                    stop = True

        loop_start, loop_eval = time.perf_counter(), eval_time[0]
        while step < total_steps and not stop:
            # The global micro-batches of batch_size x processes examples; each rank takes its rows.
            batches = train_batches(lengths, t.batch_size * world.size, seed=t.seed, epoch=epoch, group_by_length=t.group_by_length)
            for micro, global_idx in enumerate(batches):
                if micro < start_micro:  # resumed: these batches were trained on before the checkpoint
                    continue
                last_micro = micro == len(batches) - 1
                boundary = not (micro + 1) % t.gradient_accumulation_steps or last_micro
                mine = distributed.shard(global_idx, world)
                batch = to_device(train_collate(take(train_ds, mine or global_idx[:1])), device)  # a rank left without rows runs one at weight 0
                units = _loss_units(batch["labels"]) if mine else 0
                # Gradients are averaged over the ranks only at the optimizer step; accumulation steps stay local.
                with distributed.sync_gradients(forward, world, boundary), autocast(device, amp):
                    loss = forward(**batch).loss
                    # This rank's mean loss, weighted by its share of the global batch's examples (or
                    # label tokens): DDP's gradient average is then the single-process gradient.
                    units_all, loss_sum = distributed.all_sum([units, float(loss.detach()) * units], device)
                    scaled = loss * (units * world.size / max(units_all, 1))
                global_loss = loss_sum / max(units_all, 1)
                if not math.isfinite(global_loss):
                    kept = "; the last good checkpoint is kept in checkpoints/" if checkpoint.complete(run) else ""
                    raise TrainingError(f"training loss became {global_loss} at step {step}: lower train.learning_rate or use mixed_precision: no{kept}")
                scaler.scale(scaled / t.gradient_accumulation_steps).backward()
                running_loss += global_loss * len(global_idx)
                running_n += len(global_idx)
                if not boundary:
                    continue
                # ---- optimizer step ----
                if t.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                ep = epoch + (micro + 1) / len(batches)
                if step % t.logging_steps == 0 or step == total_steps:
                    avg = running_loss / max(1, running_n)
                    lr = scheduler.get_last_lr()[0]
                    history.append({"step": step, "epoch": round(ep, 4), "split": "train", "loss": avg, "lr": lr})
                    for cb in hooks:
                        cb.on_log(history[-1])
                    bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.2e}")
                    log.log(logging.DEBUG if progress else logging.INFO, "step %d/%d (epoch %.2f): loss=%.4f lr=%.2e", step, total_steps, ep, avg, lr)
                    if writer:
                        writer.add_scalar("train/loss", avg, step)
                        writer.add_scalar("train/lr", lr, step)
                    running_loss, running_n = 0.0, 0
                if t.eval_every_steps and step % t.eval_every_steps == 0:
                    run_eval(ep)
                if t.save_every_steps and step % t.save_every_steps == 0:
                    save_checkpoint(epoch, micro + 1)
                if step >= total_steps or stop:
                    break
            epoch, start_micro = epoch + 1, 0
            if not t.eval_every_steps:  # evaluate at the end of each epoch (or of a fractional last one)
                run_eval(min(epoch, step / steps_per_epoch))
            save_checkpoint(epoch, 0)
        bar.close()
        train_seconds = time.perf_counter() - loop_start - (eval_time[0] - loop_eval)  # this process's optimizer steps
        evaluated_last = any(r["split"] == "validation" and r["step"] == step for r in history)
        if not evaluated_last and not stop:
            run_eval(step / steps_per_epoch)

        # ============================================================================================
        # cleanup: best weights back in, test split, metrics, report
        # ============================================================================================
        if best_state is not None:
            distributed.load_full_state(model, best_state)
        final_weights = _adapter_state(model) if world.sharded else None  # what save_adapter writes (a collective under FSDP)
        if not world.main:  # rank 0 writes; the others help score the test split, then are done
            test_metrics = score("test") if "test" in data.splits else None
            if test_metrics is not None and t.score_base_model:
                with model.disable_adapter():
                    score("test")
            return TrainResult(run, run / "adapter", metric_name, float(best_value or 0.0), best_eval, test_metrics, history, time.perf_counter() - t0, trainable, total, main=False)
        test_metrics, base_metrics = None, None
        if "test" in data.splits:
            test_metrics = score("test")
            log.info("test (%d held-out examples): %s", len(data.splits["test"]), ", ".join(f"{k}={v:.4f}" for k, v in scalars(test_metrics).items()))
            if t.score_base_model:
                with model.disable_adapter():
                    base_metrics = score("test")
                log.info("test without the adapter (base model): %s", ", ".join(f"{k}={v:.4f}" for k, v in scalars(base_metrics).items()))
        elapsed = time.perf_counter() - t0
        final = {
            "best_metric": metric_name,
            "best_value": best_value,
            "validation": best_eval,
            "test": test_metrics,
            **({"test_base_model": base_metrics} if base_metrics else {}),
            "seconds": round(elapsed, 1),
            "train_seconds": round(train_seconds, 2),
            "precision": precision,
            "steps": step,
            "data_sizes": sizes,
            "parameters": {"trainable": trainable, "total": total},
        }
        artifacts.write_json_atomic(run / "metrics.json", final)
        artifacts.write_text_atomic(run / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        # The final adapter: the best weights, with the validation metrics of that step and the test metrics.
        meta = base_metadata() | {"trained": best_at}
        meta["metrics"] = {"validation": scalars(best_eval)} | ({"test": scalars(test_metrics)} if test_metrics else {})
        artifacts.save_adapter(model, run / "adapter", meta, card=model_card(meta), initial=Path(initial.name) / "initial" if initial else None, state_dict=final_weights)
        if cfg.output.report:
            from lorakit.report import write_report

            write_report(run / "report", title=f"{cfg.task}: {Path(cfg.output.dir).name}", history=history,
                         evaluations={"validation (best)": best_eval} | ({"test": test_metrics} if test_metrics else {}) | ({"test, base model without adapter": base_metrics} if base_metrics else {}),
                         label_space=data.label_space, meta=meta)
        checkpoint.remove_all(run)  # the run is complete; its adapter and metrics are in place
        for cb in hooks:
            cb.on_end(run, final)
        return TrainResult(run, run / "adapter", metric_name, float(best_value or 0.0), best_eval, test_metrics, history, elapsed, trainable, total)
    finally:
        if initial is not None:
            initial.cleanup()
        for cb in hooks:
            cb.close()
        if writer:
            writer.close()
        if log_file:
            log.removeHandler(log_file)
            log_file.close()


def optimizer_steps(n_train: int, t: TrainConfig, processes: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in the whole run) for ``n_train`` examples."""
    per_epoch = math.ceil(math.ceil(n_train / (t.batch_size * processes)) / t.gradient_accumulation_steps)
    return per_epoch, t.max_steps or max(1, math.ceil(t.epochs * per_epoch))


def _rank_rngs(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rank's RNG state in a checkpoint (one per process; checkpoints older than data-parallel
    training hold a single ``rng``)."""
    return state["rng_ranks"] if "rng_ranks" in state else [state["rng"]]


def _loss_units(labels: torch.Tensor) -> int:
    """What a batch's mean loss averages over: its examples, or for token labels its label tokens."""
    # Language models shift labels by one inside the forward: the first position is never a target.
    return int((labels[:, 1:] != -100).sum()) if labels.ndim > 1 else int(labels.shape[0])


def _restore_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    unexpected = distributed.load_full_state(model, weights)
    if unexpected:
        raise TrainingError(f"the checkpoint does not fit this model ({unexpected[0]} ...); start again with --overwrite")


def _check_resumable(run: Path, cfg: RunConfig) -> None:
    """Resume only with the config the run was started with (output.overwrite aside)."""
    saved_file = run / "config.yaml"
    if not saved_file.is_file():
        raise RunDirError(f"--resume: '{run}' has a checkpoint but no config.yaml; start again with --overwrite")
    saved = load_yaml(saved_file.read_text(encoding="utf-8")) or {}
    now = cfg.to_yaml_dict()
    diffs = [
        f"{section}.{key}"
        for section in sorted(set(saved) | set(now))
        for key in sorted(set(_as_dict(saved.get(section))) | set(_as_dict(now.get(section))))
        if (section, key) != ("output", "overwrite") and _as_dict(saved.get(section)).get(key) != _as_dict(now.get(section)).get(key)
    ]
    top = [k for k in ("task",) if saved.get(k) != now.get(k)]
    if diffs or top:
        raise RunDirError(f"--resume: the config differs from the one '{run}' was started with ({', '.join(top + diffs)}); resume with the same config or start again with --overwrite")


def _as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what the adapter file holds: LoRA matrices and modules_to_save copies (full
    tensors; under FSDP gathering them is a collective every rank runs)."""
    return distributed.full_state(model, lambda k: "lora_" in k or "modules_to_save" in k)
