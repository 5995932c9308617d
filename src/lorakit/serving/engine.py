"""The serving engine: one base model, many LoRA adapters, requests for different adapters batched
into one forward pass.

    request ─► encode (request thread: tokenizer / image transforms of *its* adapter)
            ─► queue ─► worker thread: wait up to `window_ms` for more requests (≤ max_batch rows)
                        ─► make sure their adapters are loaded (LRU, load on demand from the registry)
                        ─► one forward / generate with peft's `adapter_names=[...]` (mixed batch)
                        ─► split the outputs back per request

Only the worker thread touches the model, so loading, evicting, merging and forwarding never race.
With exactly one adapter and `merge_single`, the adapter is merged into the base weights (a plain
forward, no LoRA overhead) and unmerged when a second adapter is needed.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.build import adapter_config, load_adapter
from lorakit.adapters.folder import adapter_method, find_adapter_dir, other_base, read_metadata
from lorakit.adapters.registry import Registry, check_name, parse_ref
from lorakit.config.schema import METHOD_NAMES, DataConfig
from lorakit.data.labels import LabelSpace
from lorakit.errors import AdapterError, LorakitError
from lorakit.runtime.memory import trim_heap
from lorakit.serving import mixed
from lorakit.tasks.base import Task

log = logging.getLogger("lorakit")

#: Requests naming this adapter run on the bare base model (when the engine allows it).
BASE = "base"
TRIM_EVERY_S = 1.0  # at most this often, and only when no request waits


class UnknownAdapter(LorakitError):
    """A request names an adapter that is neither loaded nor in the registry."""


@dataclass
class AdapterInfo:
    """What the engine knows of an adapter without its weights in the model."""

    name: str
    path: Path
    meta: dict[str, Any]
    data_cfg: DataConfig
    label_space: LabelSpace | None
    source: str

    def describe(self, loaded: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.meta.get("task"),
            "source": self.source,
            "loaded": loaded,
            "method": adapter_method(self.meta),
            "labels": list(self.label_space.labels) if self.label_space else None,
            "metrics": self.meta.get("metrics", {}).get("test")
            or self.meta.get("metrics", {}).get("validation"),
        }


@dataclass
class _Job:
    adapter: str
    rows: list[Any]  # what the task's serving_rows / chat_prompt_ids made (tensors, prompt ids)
    # what the request asked, the same for every row of a pass (GenerateOptions for generating tasks)
    options: Any = None
    control: Any = None  # a function the worker runs between passes (adapter loads and unloads)
    future: cf.Future = field(default_factory=cf.Future)


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # recent, for the metrics histogram
    loads: int = 0
    evictions: int = 0


class Engine:
    """Serve adapters of one task on one base model.

    Args:
        adapters: ``NAME=PATH``, a folder (named after it) or a registry reference ``name[:version]``;
            the first one fixes the base model, the task and (classification) the head shape.
        registry: Registry root: adapters given by name, admin loads, and (``on_demand``) names first
            seen in requests are resolved there, hash-verified.
        on_demand: Load registry adapters the first time a request names them.
        max_adapters: Adapters kept in the model at once (least recently used ones are unloaded; the
            first one stays, as it holds peft's layers).
        max_batch: Rows per forward pass.
        window_ms: How long the worker waits for more requests to join a batch.
        merge_single: Merge the adapter into the base weights while it is the only one.
        allow_base: Accept requests for the bare base model (adapter ``"base"``).
        gathered: Run mixed-adapter batches with gathered batched matmuls (:mod:`.mixed`) instead
            of peft's per-adapter loop (same results).
        adapter_dtype: ``float32``, or ``float16`` / ``bfloat16`` to hold LoRA matrices in half the
            memory (computed in the base model's precision by the gathered kernel; no merging then).
        device: ``auto``, ``cpu``, ``cuda``.
    """

    def __init__(
        self,
        adapters: list[str],
        *,
        registry: str | Path | None = None,
        on_demand: bool = True,
        max_adapters: int = 64,
        max_batch: int = 32,
        window_ms: float = 5.0,
        merge_single: bool = True,
        allow_base: bool = False,
        gathered: bool = True,
        adapter_dtype: str = "float32",
        device: str = "auto",
    ) -> None:
        if not adapters:
            raise AdapterError(
                "serve needs at least one adapter (NAME=PATH, a folder or a registry name); "
                "it fixes the base model"
            )
        self.registry = Registry(registry) if registry is not None else None
        self.on_demand = on_demand
        self.max_adapters, self.max_batch, self.window = (
            max(1, max_adapters),
            max(1, max_batch),
            window_ms / 1000,
        )
        if adapter_dtype not in ("float32", "float16", "bfloat16"):
            raise AdapterError(f"adapter dtype '{adapter_dtype}' is not one of float32, float16, bfloat16")
        self.storage = getattr(torch, adapter_dtype)
        # Reduced-precision storage needs the gathered kernel (it upcasts) and rules out merging.
        gathered = gathered or self.storage != torch.float32
        self.merge_single = merge_single and self.storage == torch.float32
        self.allow_base, self.gathered = allow_base, gathered
        self.known: dict[str, AdapterInfo] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # LRU order, most recent last
        self.stats = EngineStats()
        self.mixed_ok = True  # False once the model refused a mixed-adapter batch
        self._lock = threading.Lock()  # guards known / loaded bookkeeping and the shared processor
        self._merged = False
        self._queue: queue.Queue[_Job | None] = queue.Queue()

        first = self._resolve(adapters[0], paths=True)
        #: The adapters' method (``lora.method``): one per server, as peft holds one kind per model.
        self.method = adapter_method(first.meta)
        if self.method != "lora":
            gathered = self.gathered = self._lycoris_path(first.name)
        loaded = load_adapter(
            first.path, device=device, adapter_name=first.name
        )  # the base every adapter shares
        self.task: Task = loaded.task
        self.base_fingerprint = first.meta["base_model"].get("fingerprint")
        self.base_name = first.meta["base_model"]["name_or_path"]
        self.processor, self.device, self.model = loaded.processor, loaded.device, loaded.model
        self.head_labels = first.label_space.num_labels if first.label_space else None
        model = self.model.get_base_model()
        # With the gathered kernel, adapters after the first go to a light store when they fit its layers.
        self.store = mixed.AdapterStore(self.model) if gathered else None
        self._store(first.name)
        #: Longest sequence the base model reads (prompt + answer), when it says.
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        self.known[first.name] = first
        self.loaded[first.name] = None
        self.anchor = first.name  # loaded through peft: its LoRA layers stay while the server runs
        self.stats.loads += 1
        for spec in adapters[1:]:
            self._load(self.add(spec, paths=True))
        self._sync_merge()
        self._worker = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._worker.start()

    def _lycoris_path(self, name: str) -> bool:
        """LoHa / LoKr: the gathered multi-adapter kernel (and peft's mixed batches) apply to LoRA only, so
        a lone adapter is served merged and several run one pass per adapter. Returns ``gathered``: False.

        Raises:
            AdapterError: Reduced-precision adapter storage was asked for (it needs the gathered kernel).
        """
        kind = METHOD_NAMES[self.method]
        if self.storage != torch.float32:
            raise AdapterError(
                f"adapter '{name}' is a {kind} adapter: its weights are held in float32 (the reduced-"
                "precision storage needs the gathered kernel of LoRA); drop --adapter-dtype"
            )
        self.mixed_ok = False  # peft's mixed batches are LoRA's: one pass per adapter
        log.info(
            "%s adapters: no gathered multi-adapter kernel; one adapter is served merged, several with one "
            "pass per adapter in a batch",
            kind,
        )
        return False

    # ---- adapters ---------------------------------------------------------------------------------
    def _resolve(self, spec: str, *, paths: bool = False) -> AdapterInfo:
        """``NAME=PATH`` | folder (``paths`` only: operator input) | registry reference -> AdapterInfo.

        Requests and admin calls resolve registry names only: a name is validated before anything
        touches the disk, so no request can point the server at a file.
        """
        name, sep, rest = spec.partition("=")
        if not paths:
            name, _ = parse_ref(spec)  # raises on anything but name[:version]
            sep = ""
        if sep:
            check_name(name)
            path, source = find_adapter_dir(rest), rest
        elif paths and Path(spec).exists():
            path = find_adapter_dir(spec)
            meta_name = path.parent.name if path.name == "adapter" else path.name
            name, source = check_name(meta_name.lower()), spec
        else:
            if self.registry is None:
                raise UnknownAdapter(
                    f"adapter '{spec}' is not a folder and no registry is configured (--registry)"
                )
            name, _ = parse_ref(spec)
            try:
                path = self.registry.pull(spec)  # verified against the published hashes
            except LorakitError as exc:
                raise UnknownAdapter(str(exc)) from None
            source = f"registry:{self.registry.get(spec).ref}"
        if name == BASE:
            raise AdapterError(f"'{BASE}' is reserved for the bare base model; give the adapter another name")
        meta = read_metadata(path)
        data_cfg = adapter_config(meta).data
        space = LabelSpace.from_dict(meta["label_space"]) if meta.get("label_space") else None
        return AdapterInfo(name, path, meta, data_cfg, space, source)

    def _check_fits(self, info: AdapterInfo) -> None:
        method = adapter_method(info.meta)
        if method != self.method:
            raise AdapterError(
                f"adapter '{info.name}' is a {METHOD_NAMES.get(method, method)} adapter; this server serves "
                f"{METHOD_NAMES[self.method]} adapters (one kind per server): serve it on a server of its own"
            )
        if info.meta.get("task") != self.task.name:
            raise AdapterError(
                f"adapter '{info.name}' is a {info.meta.get('task')} adapter; this server "
                f"serves {self.task.name}"
            )
        fp = info.meta["base_model"].get("fingerprint")
        if other_base(self.base_fingerprint, fp):
            raise AdapterError(
                f"adapter '{info.name}' was trained on another base model "
                f"({info.meta['base_model']['name_or_path']}); this server's base differs"
            )
        if (
            self.head_labels is not None
            and info.label_space
            and info.label_space.num_labels != self.head_labels
        ):
            raise AdapterError(
                f"adapter '{info.name}' has {info.label_space.num_labels} labels but this server's "
                f"classification head has {self.head_labels}; serve it on a server of its own"
            )

    def add(self, spec: str, *, paths: bool = False) -> AdapterInfo:
        """Register an adapter (validated; its weights load on first use). ``paths`` admits folders
        (operator input at start-up); otherwise only registry names are resolved."""
        info = self._resolve(spec, paths=paths)
        self._check_fits(info)
        with self._lock:
            self.known[info.name] = info
        return info

    def info(self, name: str) -> AdapterInfo:
        """The adapter a request names, registering it from the registry on first use; for ``base``
        (when allowed) the first adapter's settings, which preprocess its inputs the same way.

        Raises:
            UnknownAdapter: Not loaded, not given at start, not in the registry; or ``base`` not allowed.
        """
        if name == BASE:
            if not self.allow_base:
                raise UnknownAdapter(f"adapter '{BASE}' (the bare base model) is not served here")
            with self._lock:
                return next(iter(self.known.values()))
        with self._lock:
            found = self.known.get(name)
        if found is not None:
            return found
        if self.registry is None or not self.on_demand:
            raise UnknownAdapter(f"adapter '{name}' is not served here; GET /v1/adapters lists the adapters")
        return self.add(name)

    def remove(self, name: str) -> None:
        """Forget an adapter (its weights are unloaded by the worker)."""
        with self._lock:
            if name not in self.known:
                raise UnknownAdapter(f"adapter '{name}' is not served here")
            if len(self.known) == 1:
                raise AdapterError(f"adapter '{name}' is the last one; a server keeps at least one")
            del self.known[name]
        self._control(lambda: self._unload(name))

    def adapters(self) -> list[dict[str, Any]]:
        with self._lock:
            return [info.describe(name in self.loaded) for name, info in self.known.items()]

    # ---- worker-side model changes (only ever called in the worker thread or before it starts) ----
    def _load(self, info: AdapterInfo) -> None:
        if info.name in self.loaded:
            self.loaded.move_to_end(info.name)
            return
        self._unmerge()
        if self.store is not None and self.store.fits(info.path):
            self.store.add(info.path, info.name, dtype=self.storage, device=self.device)
        else:
            self.model.load_adapter(str(info.path), adapter_name=info.name, is_trainable=False)
            self.model.to(self.device)
            if self.store is not None:
                self.store.refresh()  # layers new to this adapter's targets
            self._store(info.name)
        self.loaded[info.name] = None
        self.stats.loads += 1
        # Evict after loading, least recently used first; never the adapter just loaded, nor the first
        # one (peft's layers, which the light store uses, hang on it).
        while len(self.loaded) > self.max_adapters:
            victim = next((n for n in self.loaded if n not in (info.name, self.anchor)), None)
            if victim is None:
                break
            self._unload(victim, evicted=True)

    def _store(self, name: str) -> None:
        """Hold an adapter's LoRA matrices in the storage dtype (heads stay in full precision)."""
        if self.storage == torch.float32:
            return
        for module in self.model.modules():
            for part in ("lora_A", "lora_B"):
                layer = getattr(module, part, None)
                if isinstance(layer, torch.nn.ModuleDict) and name in layer:
                    layer[name].to(self.storage)

    def _unload(self, name: str, *, evicted: bool = False) -> None:
        if name not in self.loaded or name == self.anchor:  # the anchor holds peft's LoRA layers
            return
        self._unmerge()
        if self.store is not None and name in self.store.names:
            self.store.remove(name)
        else:
            if self.model.active_adapter == name:
                self.model.set_adapter(self.anchor)
            self.model.delete_adapter(name)
        del self.loaded[name]
        self.stats.evictions += evicted

    def _unmerge(self) -> None:
        if self._merged:
            self.model.unmerge_adapter()
            self._merged = False

    def _sync_merge(self) -> None:
        """Merged fast path while exactly one adapter is served and in the model."""
        if self.merge_single and len(self.known) == 1 and len(self.loaded) == 1 and not self._merged:
            name = next(iter(self.loaded))
            if name in self.known:
                self.model.set_adapter(name)
                self.model.merge_adapter()
                self._merged = True
        elif self._merged and (len(self.known) != 1 or len(self.loaded) != 1):
            self._unmerge()

    # ---- requests -----------------------------------------------------------------------------------
    def encode(self, adapter: str, inputs: list[Any]) -> list[Any]:
        """Model rows for a classify request, with the adapter's own preprocessing settings."""
        info = self.info(adapter)
        with self._lock:  # the tokenizer is shared and its truncation side set per adapter
            return self.task.serving_rows(self.processor, info.data_cfg, inputs)

    def encode_chat(self, adapter: str, messages: list[dict[str, str]]) -> list[int]:
        info = self.info(adapter)
        with self._lock:
            return self.task.chat_prompt_ids(self.processor, info.data_cfg, messages)

    def records(
        self, adapter: str, inputs: list[Any], rows: list[Any], outputs: list[Any], top_k: int
    ) -> list[Any]:
        """Prediction records of the task for a predict request's outputs."""
        return self.task.serving_records(inputs, rows, outputs, self.info(adapter).label_space, top_k=top_k)

    def submit(self, adapter: str, rows: list[Any], options: Any = None) -> cf.Future:
        """Queue encoded rows for ``adapter``; the future gets the per-row outputs."""
        job = _Job(adapter, rows, options)
        self._queue.put(job)
        return job.future

    def _control(self, fn: Any) -> None:
        job = _Job("", [], control=fn)
        self._queue.put(job)
        job.future.result(timeout=300)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    # ---- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        trimmed = time.monotonic()
        while True:
            if self._queue.empty() and time.monotonic() - trimmed > TRIM_EVERY_S:
                trim_heap()  # idle: return the freed batches' pages (resident memory stays flat)
                trimmed = time.monotonic()
            job = self._queue.get()
            if job is None:
                return
            jobs, rows = [job], len(job.rows)
            deadline = time.monotonic() + self.window
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
                rows += len(nxt.rows)
            self._process([j for j in jobs if j.future.set_running_or_notify_cancel()])

    def _process(self, jobs: list[_Job]) -> None:
        controls = [j for j in jobs if j.control is not None]
        for j in controls:
            try:
                j.control()
                self._sync_merge()
                j.future.set_result(None)
            except Exception as exc:
                j.future.set_exception(exc)
        work = [j for j in jobs if j not in controls]
        if not work:
            return
        groups: dict[Any, list[_Job]] = {}  # one pass per set of options (e.g. generation settings)
        for j in work:
            groups.setdefault(j.options, []).append(j)
        for batch in groups.values():
            # A batch may name more adapters than fit in the model: split it.
            chunk: list[_Job] = []
            names: set[str] = set()
            for j in batch:
                if j.adapter not in names and len(names - {BASE}) >= self.max_adapters and j.adapter != BASE:
                    self._forward(chunk)
                    chunk, names = [], set()
                chunk.append(j)
                names.add(j.adapter)
            self._forward(chunk)

    def _forward(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        try:
            names = []
            for j in jobs:
                if j.adapter != BASE:
                    with self._lock:
                        info = self.known.get(j.adapter)
                    if info is None:
                        raise UnknownAdapter(f"adapter '{j.adapter}' was removed")
                    self._load(info)
                names += [j.adapter] * len(j.rows)
            self._sync_merge()
            outputs = self._run_mixed(jobs, names)
        except Exception as exc:  # surfaced to each request as its own error
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        start = 0
        for j in jobs:
            j.future.set_result(outputs[start : start + len(j.rows)])
            start += len(j.rows)
        self.stats.batches += 1
        self.stats.rows += len(names)
        self.stats.batch_sizes = [*self.stats.batch_sizes[-999:], len(names)]

    def _run_mixed(self, jobs: list[_Job], names: list[str]) -> list[Any]:
        """One pass for all rows when the model can mix adapters in a batch; else one pass per adapter
        (peft mixes trained heads only for Linear / Embedding / Conv modules, not e.g. BatchNorm)."""
        if self.mixed_ok or len(set(names)) == 1:
            try:
                return self._run_model(jobs, names)
            except TypeError as exc:
                if "ixed batch" not in str(exc):
                    raise
                self.mixed_ok = False
                log.info(
                    "this model cannot mix adapters in one batch (%s); running one pass per adapter", exc
                )
        outputs: dict[int, list[Any]] = {}
        for adapter in dict.fromkeys(j.adapter for j in jobs):
            group = [j for j in jobs if j.adapter == adapter]
            flat = self._run_model(group, [adapter] * sum(len(j.rows) for j in group))
            start = 0
            for j in group:
                outputs[id(j)] = flat[start : start + len(j.rows)]
                start += len(j.rows)
        return [row for j in jobs for row in outputs[id(j)]]

    def _adapter_kwargs(self, names: list[str]) -> tuple[dict[str, Any], Any]:
        """Forward kwargs and a context for the adapters of a batch: merged, one adapter, base, or mixed."""
        import contextlib

        unique = set(names)
        if unique == {BASE}:
            if self._merged:
                self._unmerge()
            return {}, self.model.disable_adapter()
        light = self.store is not None and bool(unique & self.store.names)
        if len(unique) == 1 and self.storage == torch.float32 and not light:
            name = names[0]
            if self.model.active_adapter != name:
                self.model.set_adapter(name)
            return {}, contextlib.nullcontext()
        self._unmerge()
        rows = ["__base__" if n == BASE else n for n in names]
        if self.store is not None:
            return {}, self.store.rows(rows)
        return {"adapter_names": rows}, contextlib.nullcontext()

    @torch.inference_mode()
    def _run_model(self, jobs: list[_Job], names: list[str]) -> list[Any]:
        kwargs, ctx = self._adapter_kwargs(names)
        with ctx:
            return self.task.serve_batch(
                self.model, self.processor, [r for j in jobs for r in j.rows], jobs[0].options, **kwargs
            )
