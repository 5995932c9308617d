"""`lorakit train` as a recipe: setup -> train (epochs of steps, evaluations) -> finish -> cleanup.

    config ─► data (task.prepare) ─► base model + LoRA (build) ─► AdamW + schedule ─► loop
      each epoch (or every N steps): evaluate on validation, keep the best adapter
      end: reload the best weights, score the test split, write metrics, report and model card

The :class:`Recipe` holds the run's parts on ``self`` and its progress in one :class:`TrainState`, which
is what a checkpoint saves. What differs per task (data, model, loss, metrics) is asked of the task;
progress bars, TensorBoard and trackers subscribe to :mod:`~lorakit.training.events`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.adapters import folder as artifacts
from lorakit.adapters.build import build_model, load_adapter, open_base, resolve_config
from lorakit.adapters.card import model_card
from lorakit.config.loading import load_config
from lorakit.config.schema import RunConfig, load_yaml
from lorakit.data.batching import autocast, column_values, take, to_device, train_batches
from lorakit.errors import LorakitError, RunDirError
from lorakit.files import atomic
from lorakit.models import modeling
from lorakit.runtime import distributed, sharing
from lorakit.runtime.memory import release_freed_memory
from lorakit.runtime.progress import progress_bars
from lorakit.runtime.stopping import StopRequest, TrainingStopped
from lorakit.tasks import get_task
from lorakit.training import checkpoint, rundir, tracking
from lorakit.training.events import Callback, Events, ProgressBar, SharedCores, TensorBoard
from lorakit.training.optim import make_optimizer, optimizer_steps, set_seed
from lorakit.training.state import TrainState

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


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def train(
    config: RunConfig | str | Path,
    *,
    overrides: list[str] | None = None,
    overwrite: bool | None = None,
    resume: rundir.Resume = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    share_cores: bool = False,
) -> TrainResult:
    """Fine-tune a LoRA adapter as the run config says.

    Args:
        config: A :class:`RunConfig` or the path of a YAML config.
        overrides: ``section.key=value`` items applied on top of a YAML config.
        overwrite: Replace an existing run directory (defaults to ``output.overwrite``).
        resume: Continue from the newest checkpoint in the run directory (weights, optimizer,
            schedule, RNG and data position), giving the same result as an uninterrupted run.
            Without a checkpoint it is an error; ``"auto"`` starts from the beginning instead.
        progress: Show progress bars; False also hides those of datasets, transformers and
            huggingface_hub while the run lasts.
        callbacks: Subscribers to the training events (trackers, a web page, ...).
        share_cores: On CPU, share the cores with this user's other trainings on the machine
            (:mod:`lorakit.runtime.sharing`; ``lorakit train`` does) unless ``train.num_threads`` is set.

    Under ``torchrun`` / ``accelerate launch`` every process calls this: training is data-parallel
    (``train.batch_size`` per process), evaluation is shared out and gathered, and only rank 0
    writes (see :mod:`lorakit.runtime.distributed`).

    Returns:
        The run's :class:`TrainResult`; the adapter is in ``<output.dir>/adapter``.

    Raises:
        LorakitError: Any problem with the config, data, model or output folder (nothing is written).
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    t0 = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.release_memory:
        release_freed_memory()
    world, device = distributed.setup(cfg.train.device)
    level = log.level
    if not world.main:
        log.setLevel(logging.WARNING)  # rank 0 speaks for the run
    recipe = share = None
    try:
        device = device or modeling.pick_device(cfg.train.device)
        cfg = resolve_config(cfg, get_task(cfg.task), device)  # complete before anything is built
        if share_cores and device.type == "cpu" and not world.distributed:
            share = sharing.CoreShare(cfg.train.num_threads)
            share.apply(force=True, quiet=True)
            callbacks = [*callbacks, SharedCores(share)]
        # SIGTERM / SIGINT: finish the step, write a checkpoint, exit (single process; ranks would
        # have to agree).
        with (
            progress_bars(progress),  # progress=False: quiet as the CLI's --no-progress, library bars too
            StopRequest() if not world.distributed else contextlib.nullcontext() as stop_request,
        ):
            recipe = Recipe(
                cfg,
                world,
                device,
                t0=t0,
                overwrite=overwrite,
                resume=resume,
                progress=progress and world.main,
                callbacks=callbacks,
                stop_request=stop_request,
            )
            recipe.setup()
            return recipe.train()
    finally:
        if recipe is not None:
            recipe.cleanup()
        if share is not None:
            share.close()
        log.setLevel(level)
        distributed.shutdown()


class Recipe:
    """One LoRA fine-tuning run. Call :meth:`setup`, then :meth:`train`; :meth:`cleanup` always."""

    def __init__(
        self,
        cfg: RunConfig,
        world: distributed.World,
        device: torch.device,
        *,
        t0: float,
        overwrite: bool | None = None,
        resume: rundir.Resume = False,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
        stop_request: StopRequest | None = None,
    ) -> None:
        self.cfg, self.world, self.device, self.t0 = cfg, world, device, t0
        self.stop_request = stop_request  # SIGTERM / SIGINT seen: stop cleanly after the step
        self.task = get_task(cfg.task)
        self.overwrite, self.resume, self.progress = overwrite, resume, progress
        self.subscribers = list(callbacks)
        self.events = Events([])  # filled once the run folder exists (rank 0 only)
        self.state = TrainState()
        self.eval_seconds = 0.0  # seconds this process spent evaluating
        self.clock_offset = 0.0  # training seconds before a resume
        self.save_due = False  # a periodic checkpoint fell inside a group of passes
        self.initial: tempfile.TemporaryDirectory | None = None
        self.trackers: list[Callback] = []
        self.lock: rundir.RunLock | None = None
        self.log_file: logging.FileHandler | None = None

    # ============================================================================================
    # setup
    # ============================================================================================
    def setup(self) -> None:
        """Data, model, run folder, optimizer and (resuming) the saved state. Everything that can fail
        on user input is checked before the run folder is touched."""
        self.amp = modeling.pick_precision(self.cfg.train.mixed_precision, self.device)
        self._refuse_sharding_conflicts()
        # Trackers first: one that cannot be reached is an error before anything is loaded or written.
        out = self.cfg.output
        run_name = Path(out.dir).name
        self.trackers = (
            tracking.make_trackers(out.trackers, experiment=out.experiment, run_name=run_name)
            if self.world.main
            else []
        )
        self._setup_data()
        self._setup_model()
        self._setup_helpers()
        self._setup_run_dir()
        self._setup_optimizer()
        self._restore()
        self._start_events()

    def _refuse_sharding_conflicts(self) -> None:
        cfg = self.cfg
        if self.world.sharded and cfg.lora.init in ("pissa", "olora"):
            raise LorakitError(
                f"lora.init: {cfg.lora.init} is not supported with FSDP (it rewrites the sharded base "
                "weights); use lora.init: default, or launch without the FSDP config"
            )
        if self.world.sharded and cfg.model.quantization != "none":
            raise LorakitError(
                "model.quantization: a quantized base cannot be sharded with FSDP; remove "
                "model.quantization, or launch without the FSDP config (DDP)"
            )

    def _setup_data(self) -> None:
        self.base = open_base(self.task, self.cfg.model)
        self.data = self.task.prepare(self.cfg, self.base.processor)
        self.sizes = {k: len(v) for k, v in self.data.splits.items()}
        if self.world.distributed:  # every rank read and split the data itself: they must agree
            labels = self.data.label_space.labels if self.data.label_space else None
            seen = distributed.gather((labels, self.sizes), self.world)
            if any(x != seen[0] for x in seen):
                raise LorakitError(
                    f"the processes prepared different data ({seen[0]} on rank 0, "
                    f"{next(x for x in seen if x != seen[0])} elsewhere); give every node the same data files"
                )

    def _setup_model(self) -> None:
        cfg = self.cfg
        set_seed(cfg.train.seed)
        self.model = build_model(self.task, cfg, self.base, self.data.label_space)
        modeling.use_fp32_training_attention(self.model, self.device, self.amp)
        # FSDP flattens each unit's weights into one tensor of one dtype: it keeps them as they are
        self.stored_low = 0 if self.world.sharded else modeling.store_frozen_linears_in(self.model, self.amp)
        self.trainable, self.total = modeling.count_parameters(self.model)
        self.lora_cfg = self.model.peft_config["default"]
        self.head_modules = sorted(set(self.lora_cfg.modules_to_save or []))
        # PiSSA / OLoRA move part of each base weight into the adapter: the starting adapter is kept so
        # the saved one can be converted to a plain LoRA adapter (rank 2r) that applies to the original
        # base model.
        if cfg.lora.init in ("pissa", "olora") and self.world.main:
            self.initial = tempfile.TemporaryDirectory(prefix="lorakit-initial-")
            self.model.save_pretrained(str(Path(self.initial.name) / "initial"), safe_serialization=True)
        self.fingerprint = modeling.model_fingerprint(self.base.path, self.model.get_base_model())

    def _setup_helpers(self) -> None:
        """The other adapters the task trains with (reward models), checked and loaded before the run
        folder is touched."""
        wanted = self.task.helper_adapters(self.cfg)
        if not wanted:
            return

        loaded = {}
        for key, location in wanted.items():
            try:
                loaded[key] = load_adapter(location, device=self.device.type)
            except LorakitError as exc:
                raise LorakitError(f"{key}: {exc}") from None
            loaded[key].model.eval()
        self.task.use_helpers(loaded)

    def _setup_run_dir(self) -> None:
        run = Path(self.cfg.output.dir)
        self.saved = rundir.resume_state(run, self.resume)
        self.lock = rundir.RunLock(run)  # one `lorakit train` at a time per run directory (rank 0 holds it)
        distributed.barrier(
            self.world
        )  # every rank has read the checkpoint before rank 0 may clear the folder
        self.run_dir = distributed.on_main(self._prepare_run_dir, self.world) or run
        if self.world.main:
            self.log_file = logging.FileHandler(self.run_dir / "train.log", encoding="utf-8")
            self.log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log_file.setLevel(logging.DEBUG)
            log.addHandler(self.log_file)
            log.setLevel(logging.DEBUG)  # the file gets every training-loss line; the console handler filters
        self._log_setup()

    def _prepare_run_dir(self) -> Path:
        run, cfg, world = Path(self.cfg.output.dir), self.cfg, self.world
        if self.saved is not None:
            self.lock.acquire()
            _check_resumable(run, cfg)
            ranks = len(TrainState.from_checkpoint(self.saved).rng_ranks)
            if ranks != world.size:
                raise RunDirError(
                    f"--resume: the run in '{run}' was trained on {ranks} process(es), not {world.size}; "
                    "resume with the same number of processes (the batches depend on it)"
                )
            return run
        # A fresh start; with --resume-or-start and no checkpoint yet, whatever a killed run left is replaced.
        overwrite = bool(self.resume) or (
            self.overwrite if self.overwrite is not None else cfg.output.overwrite
        )
        fresh = rundir.prepare_run_dir(run, overwrite=overwrite)
        self.lock.acquire()
        rundir.clear_run_dir(fresh)
        atomic.write_text_atomic(fresh / "config.yaml", yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
        return fresh

    def _log_setup(self) -> None:
        cfg, t, lc = self.cfg, self.cfg.train, self.lora_cfg
        for note in self.data.stats.get("warnings", []):
            log.warning(note)
        log.info(
            "data: %s; labels: %s",
            self.sizes,
            ", ".join(self.data.label_space.labels) if self.data.label_space else "-",
        )
        targets = sorted(lc.target_modules) if not isinstance(lc.target_modules, str) else lc.target_modules
        log.info(
            "model: %s (%s) with LoRA r=%d on %s; trainable %s / %s params (%.2f%%)",
            cfg.model.name_or_path,
            self.model.get_base_model().config.model_type,
            cfg.lora.r,
            targets,
            f"{self.trainable:,}",
            f"{self.total:,}",
            100 * self.trainable / self.total,
        )
        per_step = t.batch_size * self.world.size * t.gradient_accumulation_steps
        processes = (
            f", {self.world.size} processes (batch {t.batch_size} per process, {per_step} per step)"
            if self.world.distributed
            else ""
        )
        stored = f" ({self.stored_low} frozen Linear layers stored in bf16)" if self.stored_low else ""
        log.info(
            "device: %s, precision: %s%s, threads: %d%s",
            self.device,
            modeling.precision_name(self.amp),
            stored,
            torch.get_num_threads(),
            processes,
        )

    def _setup_optimizer(self) -> None:
        t, world = self.cfg.train, self.world
        self.model.to(self.device)
        self.model.train()
        self.forward = distributed.wrap(
            self.model, world, self.device
        )  # the training forward / backward; DDP or FSDP when launched
        self.train_collate = self.task.collate(self.base.processor, self.cfg.data, train=True)
        self.train_ds = self.data.splits["train"]
        self.lengths = (
            column_values(self.train_ds, "length")
            if "length" in self.train_ds.column_names
            else [1] * len(self.train_ds)
        )
        # An online task (RL) may make several optimizer updates on each batch it generated.
        self.passes = self.task.updates_per_batch(t)
        batches_per_epoch, _ = optimizer_steps(len(self.train_ds), t, world.size)
        self.steps_per_epoch = batches_per_epoch * self.passes
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.optimizer, self.scheduler, self.scaler = make_optimizer(
            self.model,
            t,
            self.head_modules,
            self.total_steps,
            device=self.device,
            amp=self.amp,
            sharded=world.sharded,
        )

    def _restore(self) -> None:
        """Resume: weights, optimizer, schedule, scaler, progress and (last) the random generators."""
        if self.saved is None:
            return
        saved, self.saved = self.saved, None
        unexpected = distributed.load_full_state(self.model, saved["trainable"])
        if unexpected:
            raise TrainingError(
                f"the checkpoint does not fit this model ({unexpected[0]} ...); start again with --overwrite"
            )
        distributed.load_optimizer_state(self.model, self.optimizer, saved["optimizer"], self.world)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState.from_checkpoint(saved)
        self.clock_offset = self.state.run_seconds
        checkpoint.set_rng_state(
            self.state.rng_ranks[self.world.rank]
        )  # last: everything above may have drawn random numbers
        log.info(
            "resumed from checkpoint at step %d (epoch %d, batch %d)",
            self.state.step,
            self.state.epoch,
            self.state.micro,
        )

    def _start_events(self) -> None:
        if not self.world.main:
            return
        # history.jsonl grows row by row while the run goes (`lorakit tune` and the UI read it live)
        builtin: list[Callback] = [tracking.HistoryFile()]
        if self.progress:
            builtin.append(ProgressBar(self.total_steps, self.state.step))
        if "tensorboard" in self.cfg.output.trackers:
            builtin.append(TensorBoard())
        self.events = Events(builtin + self.trackers + self.subscribers)
        info = {
            "task": self.cfg.task,
            "base_model": self.cfg.model.name_or_path,
            "model_type": self.model.get_base_model().config.model_type,
            "data_sizes": self.sizes,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "total_steps": self.total_steps,
        }
        self.events.on_start(self.run_dir, self.cfg.to_yaml_dict(), info)

    # ============================================================================================
    # train
    # ============================================================================================
    def train(self) -> TrainResult:
        """Epochs until the last step or early stopping, evaluations as scheduled, then :meth:`finish`."""
        s, t = self.state, self.cfg.train
        loop_start, loop_eval = time.perf_counter(), self.eval_seconds
        while s.step < self.total_steps and not s.stop:
            self.train_epoch()
            s.epoch, s.micro = s.epoch + 1, 0
            if not t.eval_every_steps:  # evaluate at the end of each epoch (or of a fractional last one)
                self.evaluate(min(s.epoch, s.step / self.steps_per_epoch))
            self.save_checkpoint()
        self.train_seconds = (
            time.perf_counter() - loop_start - (self.eval_seconds - loop_eval)
        )  # this process's optimizer steps
        evaluated_last = any(r["split"] == "validation" and r["step"] == s.step for r in s.history)
        if not evaluated_last and not s.stop:
            self.evaluate(s.step / self.steps_per_epoch)
        return self.finish()

    def train_epoch(self) -> None:
        """The micro-batches of one epoch from the current data position; an optimizer step every
        ``gradient_accumulation_steps`` of them (and at the epoch's end), made ``self.passes`` times on
        the same batches where the task asks for it (PPO-style updates of online tasks)."""
        s, t = self.state, self.cfg.train
        # The global micro-batches of batch_size x processes examples; each rank takes its rows.
        batches = train_batches(
            self.lengths,
            t.batch_size * self.world.size,
            seed=t.seed,
            epoch=s.epoch,
            group_by_length=t.group_by_length,
        )
        group: list[list[int]] = []
        for micro, global_idx in enumerate(batches):
            if micro < s.micro:  # resumed: these batches were trained on before the checkpoint
                continue
            group.append(global_idx)
            if (micro + 1) % t.gradient_accumulation_steps and micro != len(batches) - 1:
                continue
            self.train_group(group, micro + 1, s.epoch + (micro + 1) / len(batches))
            group = []
            if s.step >= self.total_steps or s.stop:
                break

    def train_group(self, group: list[list[int]], next_micro: int, epoch: float) -> None:
        """The optimizer step(s) on one group of accumulated micro-batches. The task makes each batch
        once (:meth:`~lorakit.tasks.base.Task.rollout`: an online task generates and scores answers
        here); every further pass reuses them. Checkpoints and stop requests wait for the group's last
        pass, so a resume starts at a group's beginning, with the random state of then."""
        s = self.state
        made: list[tuple[dict[str, Any], int, int]] = []
        for p in range(self.passes):
            for i, global_idx in enumerate(group):
                if p == 0:
                    made.append(self.make_batch(global_idx))
                self.backward(*made[i], boundary=i == len(group) - 1)
            self.optimizer_step()
            last = p == self.passes - 1 or s.step >= self.total_steps
            if last:
                s.micro = next_micro
            self.after_step(epoch, group_done=last)
            if s.step >= self.total_steps or s.stop:
                return

    def make_batch(self, global_idx: list[int]) -> tuple[dict[str, Any], int, int]:
        """(this rank's model batch of one global micro-batch, its loss units, the global row count)."""
        mine = distributed.shard(global_idx, self.world)
        batch = to_device(
            self.train_collate(take(self.train_ds, mine or global_idx[:1])), self.device
        )  # a rank left without rows runs one at weight 0
        with autocast(self.device, self.amp):
            batch, metrics = self.task.rollout(self.model, batch)
        self.add_train_metrics(metrics)
        return batch, self.task.loss_units(batch) if mine else 0, len(global_idx)

    def add_train_metrics(self, metrics: dict[str, float]) -> None:
        """Sum a micro-batch's task metrics (rewards, KL, ...) into the next logged training row."""
        for k, v in metrics.items():
            total, n = self.state.running_metrics.get(k, (0.0, 0))
            self.state.running_metrics[k] = (total + float(v), n + 1)

    def backward(self, batch: dict[str, Any], units: int, rows: int, boundary: bool) -> None:
        """Forward and backward of this rank's part of one global micro-batch (``rows`` rows in all)."""
        s, t, world = self.state, self.cfg.train, self.world
        # Gradients are averaged over the ranks only at the optimizer step; accumulation steps stay local.
        with distributed.sync_gradients(self.forward, world, boundary), autocast(self.device, self.amp):
            loss, metrics = self.task.loss_with_metrics(self.forward, batch)
            # This rank's mean loss, weighted by its share of the global batch's examples (or label
            # tokens): DDP's gradient average is then the single-process gradient.
            units_all, loss_sum = distributed.all_sum([units, float(loss.detach()) * units], self.device)
            scaled = loss * (units * world.size / max(units_all, 1))
        global_loss = loss_sum / max(units_all, 1)
        if not math.isfinite(global_loss):
            kept = (
                "; the last good checkpoint is kept in checkpoints/"
                if checkpoint.complete(self.run_dir)
                else ""
            )
            raise TrainingError(
                f"training loss became {global_loss} at step {s.step}: lower train.learning_rate "
                f"or use mixed_precision: no{kept}"
            )
        self.scaler.scale(scaled / t.gradient_accumulation_steps).backward()
        self.add_train_metrics(metrics)
        s.running_loss += global_loss * rows
        s.running_n += rows

    def optimizer_step(self) -> None:
        t = self.cfg.train
        if t.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], t.max_grad_norm
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.events.on_step(self.state.step)

    def after_step(self, epoch: float, *, group_done: bool = True) -> None:
        """Logging, evaluation and checkpoints that fall on the step just made (a checkpoint due
        before the end of a group of passes is written at its end, see :meth:`train_group`)."""
        step, t = self.state.step, self.cfg.train
        if step % t.logging_steps == 0 or step == self.total_steps:
            self.log_train_loss(epoch)
        if t.eval_every_steps and step % t.eval_every_steps == 0:
            self.evaluate(epoch)
        self.save_due |= bool(t.save_every_steps) and step % t.save_every_steps == 0
        if not group_done:
            return
        if self.save_due:
            self.save_checkpoint()
        if self.stop_request and self.stop_request.requested and step < self.total_steps:
            self.save_checkpoint()  # the same state a periodic checkpoint holds: resume is exact
            why = self.stop_request.requested
            log.info(
                "stopped by %s at step %d/%d; checkpoint written, continue with --resume",
                why,
                step,
                self.total_steps,
            )
            resume = f"lorakit train {self.run_dir / 'config.yaml'} --resume"
            raise TrainingStopped(
                f"stopped by {why} at step {step} of {self.total_steps}; resume with: {resume}"
            )

    def log_train_loss(self, epoch: float) -> None:
        s = self.state
        avg, lr = s.running_loss / max(1, s.running_n), self.scheduler.get_last_lr()[0]
        row = {"step": s.step, "epoch": round(epoch, 4), "split": "train", "loss": avg, "lr": lr}
        row |= {k: total / max(1, n) for k, (total, n) in sorted(s.running_metrics.items())}
        s.running_metrics = {}
        s.history.append(row)
        log.log(
            logging.DEBUG if self.progress else logging.INFO,
            "step %d/%d (epoch %.2f): loss=%.4f lr=%.2e",
            s.step,
            self.total_steps,
            epoch,
            avg,
            lr,
        )
        self.events.on_log(row)
        s.running_loss, s.running_n = 0.0, 0

    def evaluate(self, epoch: float) -> None:
        """Score the validation split; keep the adapter if it is the best so far; early stopping."""
        s, t = self.state, self.cfg.train
        started = time.perf_counter()
        metrics = self.score("validation")
        # seconds: time since the run started, evaluations left out (when the run reached this point)
        elapsed = started - self.t0 - self.eval_seconds + self.clock_offset
        self.eval_seconds += time.perf_counter() - started
        metric = t.metric_for_best
        if metric not in metrics:
            raise TrainingError(
                f"train.metric_for_best: '{metric}' is not computed for {self.cfg.task}; choose "
                f"one of {', '.join(scalars(metrics))}"
            )
        row = {
            "step": s.step,
            "epoch": round(epoch, 4),
            "split": "validation",
            "seconds": round(elapsed, 2),
            **scalars(metrics),
        }
        s.history.append(row)
        self.events.on_eval(row)
        value = float(metrics[metric])
        improved = s.improved(value, bool(t.greater_is_better))
        log.info(
            "eval step %d (epoch %.2f): %s%s",
            s.step,
            epoch,
            ", ".join(f"{k}={v:.4f}" for k, v in scalars(metrics).items()),
            "  (best)" if improved else "",
        )
        if improved:
            s.best_value, s.best_eval, s.evals_without_gain, s.best_at = (
                value,
                metrics,
                0,
                {"step": s.step, "epoch": epoch},
            )
            # Kept in memory and in checkpoints; adapter/ is written once, when the run is complete,
            # so an interrupted run never leaves something that looks like a finished adapter.
            s.best_state = self.adapter_state()
            return
        s.evals_without_gain += 1
        if t.early_stopping_patience and s.evals_without_gain >= t.early_stopping_patience:
            log.info("early stopping: no gain in %s for %d evaluations", metric, s.evals_without_gain)
            s.stop = True

    def score(self, split: str) -> dict[str, Any]:
        """The task's metrics of the model as it is now on ``split``."""
        from tqdm.auto import tqdm

        distributed.sync_buffers(self.model, self.world)
        bar = tqdm(
            total=len(self.data.splits[split]),
            desc=split,
            unit="ex",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        return self.task.evaluate(
            self.model,
            self.data.splits[split],
            self.base.processor,
            self.cfg,
            self.data.label_space,
            batch_size=self.cfg.train.eval_batch_size,
            device=self.device,
            amp=self.amp,
            progress=bar,
        )

    def save_checkpoint(self) -> None:
        """Write the training state, weights, optimizer, schedule and scaler (rank 0; collectives on all)."""
        s = self.state
        self.save_due = False
        s.rng_ranks = distributed.gather(
            checkpoint.rng_state(), self.world
        )  # each rank draws its own dropout masks
        weights, optim = (
            self.adapter_state(),
            distributed.optimizer_state(self.model, self.optimizer, self.world),
        )  # collectives under FSDP
        if not self.world.main:
            return
        s.run_seconds = time.perf_counter() - self.t0 - self.eval_seconds + self.clock_offset
        payload = s.to_checkpoint(
            trainable=weights,
            optimizer=optim,
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
        )
        checkpoint.save(self.run_dir, s.step, payload)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of what the adapter file holds: LoRA matrices and modules_to_save copies (full
        tensors; under FSDP gathering them is a collective every rank runs)."""
        return distributed.full_state(self.model, modeling.is_adapter_weight)

    # ============================================================================================
    # finish: best weights back in, test split, metrics, adapter, report
    # ============================================================================================
    def finish(self) -> TrainResult:
        s, cfg = self.state, self.cfg
        if s.best_state is not None:
            distributed.load_full_state(self.model, s.best_state)
        final_weights = (
            self.adapter_state() if self.world.sharded else None
        )  # what save_adapter writes (a collective under FSDP)
        test_metrics, base_metrics = self.score_test()
        if not self.world.main:  # rank 0 writes; the others helped score the test split and are done
            return self.result(test_metrics, main=False)
        elapsed = time.perf_counter() - self.t0
        final = {
            "best_metric": cfg.train.metric_for_best,
            "best_value": s.best_value,
            "validation": s.best_eval,
            "test": test_metrics,
            **({"test_base_model": base_metrics} if base_metrics else {}),
            "seconds": round(elapsed, 1),
            "train_seconds": round(self.train_seconds, 2),
            "precision": modeling.precision_name(self.amp),
            "steps": s.step,
            "data_sizes": self.sizes,
            "parameters": {"trainable": self.trainable, "total": self.total},
        }
        # The final adapter: the best weights, with the validation metrics of that step and the test metrics.
        meta = self.metadata(
            {"validation": scalars(s.best_eval)} | ({"test": scalars(test_metrics)} if test_metrics else {})
        )
        initial = Path(self.initial.name) / "initial" if self.initial else None
        artifacts.save_adapter(
            self.model,
            self.run_dir / "adapter",
            meta,
            card=model_card(meta),
            initial=initial,
            state_dict=final_weights,
        )
        if cfg.output.report:
            self.write_report(meta, test_metrics, base_metrics)
        # metrics.json last: it marks the run finished, so a failed write above (a full disk) can be resumed.
        atomic.write_text_atomic(
            self.run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in s.history)
        )
        atomic.write_json_atomic(self.run_dir / "metrics.json", final)
        checkpoint.remove_all(self.run_dir)  # the run is complete; its adapter and metrics are in place
        self.events.on_end(self.run_dir, final)
        return self.result(test_metrics, seconds=elapsed)

    def score_test(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The test split's metrics with the adapter, and (``score_base_model``) without it."""
        if "test" not in self.data.splits:
            return None, None
        test = self.score("test")
        log.info(
            "test (%d held-out examples): %s",
            len(self.data.splits["test"]),
            ", ".join(f"{k}={v:.4f}" for k, v in scalars(test).items()),
        )
        if not self.cfg.train.score_base_model:
            return test, None
        with self.model.disable_adapter():
            base = self.score("test")
        log.info(
            "test without the adapter (base model): %s",
            ", ".join(f"{k}={v:.4f}" for k, v in scalars(base).items()),
        )
        return test, base

    def metadata(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """lorakit.json: what later stages need to use the adapter without asking again."""
        return artifacts.build_metadata(
            self.cfg,
            self.lora_cfg,
            resolved=self.base.path,
            model_type=getattr(self.model.get_base_model().config, "model_type", None),
            fingerprint=self.fingerprint,
            label_space=self.data.label_space,
            data_sizes=self.sizes,
            data_stats=self.data.stats,
            parameters=(self.trainable, self.total),
            metrics=metrics,
            trained=self.state.best_at,
        )

    def write_report(
        self, meta: dict[str, Any], test: dict[str, Any] | None, base: dict[str, Any] | None
    ) -> None:
        from lorakit.evaluation.report import write_report

        evaluations = (
            {"validation (best)": self.state.best_eval}
            | ({"test": test} if test else {})
            | ({"test, base model without adapter": base} if base else {})
        )
        write_report(
            self.run_dir / "report",
            title=f"{self.cfg.task}: {Path(self.cfg.output.dir).name}",
            history=self.state.history,
            evaluations=evaluations,
            task=self.task,
            label_space=self.data.label_space,
            meta=meta,
        )

    def result(
        self, test: dict[str, Any] | None, *, main: bool = True, seconds: float | None = None
    ) -> TrainResult:
        s = self.state
        return TrainResult(
            self.run_dir,
            self.run_dir / "adapter",
            self.cfg.train.metric_for_best or "",
            float(s.best_value or 0.0),
            s.best_eval,
            test,
            s.history,
            seconds if seconds is not None else time.perf_counter() - self.t0,
            self.trainable,
            self.total,
            main=main,
        )

    # ============================================================================================
    # cleanup
    # ============================================================================================
    def cleanup(self) -> None:
        """Release what setup opened, whether the run finished or not."""
        if self.lock is not None:
            self.lock.release()
        if self.initial is not None:
            self.initial.cleanup()
        self.events.close()
        if not self.events.callbacks:  # the run stopped before its events started: trackers made, never used
            Events(self.trackers).close()
        if self.log_file:
            log.removeHandler(self.log_file)
            self.log_file.close()


def _check_resumable(run: Path, cfg: RunConfig) -> None:
    """Resume only with the config the run was started with (output.overwrite aside)."""
    saved_file = run / "config.yaml"
    if not saved_file.is_file():
        raise RunDirError(
            f"--resume: '{run}' has a checkpoint but no config.yaml; start again with --overwrite"
        )
    saved = load_yaml(saved_file.read_text(encoding="utf-8")) or {}
    now = cfg.to_yaml_dict()
    diffs = [
        f"{section}.{key}"
        for section in sorted(set(saved) | set(now))
        for key in sorted(set(_as_dict(saved.get(section))) | set(_as_dict(now.get(section))))
        if (section, key) != ("output", "overwrite")
        and _as_dict(saved.get(section)).get(key) != _as_dict(now.get(section)).get(key)
    ]
    top = [k for k in ("task",) if saved.get(k) != now.get(k)]
    if diffs or top:
        raise RunDirError(
            f"--resume: the config differs from the one '{run}' was started with ({', '.join(top + diffs)}); "
            "resume with the same config or start again with --overwrite"
        )


def _as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}
