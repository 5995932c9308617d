"""Training-step time of the Fashion-MNIST demo's model (EfficientNet-Lite0 + LoRA, batch 64, 64 px), with
and without the two CPU levers of issue 26, each configuration in its own process:

  before   strided depthwise convolutions in bf16 (PyTorch's kernel) and malloc's mmap threshold at 8 MiB
           (`train.release_memory: true`): the image task as it was until 2026-12-01
  dw-fp32  the four strided depthwise convolutions in fp32 under autocast (zoo.Fp32OnCpuConv), threshold
           still at 8 MiB
  now      both levers: strided depthwise in fp32, glibc's own malloc thresholds (the image task's
           `train.release_memory: false`)
  fp32     `train.mixed_precision: no`, glibc's own thresholds
  layers   the backward of the four strided depthwise convolutions alone, fp32 against bf16

Each step configuration builds the model with lorakit's own code (config, data pipeline, augmentation,
peft), trains STEPS steps of 64 images (AdamW, bf16 autocast where the host has it, as `lorakit train`),
and reports the median time of a step and of its parts, the process's user / system CPU seconds and
peak RSS.

    .venv/bin/python -u bench/image_step.py                       # before, dw-fp32, now, fp32, layers: ~4 min
    .venv/bin/python -u bench/image_step.py --only before now before now
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SCRIPT = Path(__file__).resolve()
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion-mnist-efficientnet.yaml"
STEPS, WARMUP, BATCH = 30, 5, 64


def steps(name: str, quick: bool) -> dict:
    import torch

    import lorakit
    from lorakit.adapters import build
    from lorakit.data.batching import autocast, take
    from lorakit.models import modeling, zoo
    from lorakit.tasks import get_task
    from lorakit.training import release_freed_memory

    if name in ("before", "dw-fp32"):
        release_freed_memory()  # what train.release_memory: true does
    if name == "before":  # the strided depthwise convolutions as PyTorch runs them under autocast
        zoo.Fp32OnCpuConv.forward = lambda self, x: self._conv_forward(
            self.static_padding(x), self.weight, self.bias
        )
    n_steps = 3 if quick else STEPS
    overrides = [f"data.max_train_samples={BATCH * (n_steps + WARMUP)}", "data.max_eval_samples=64"]
    if name == "fp32":
        overrides.append("train.mixed_precision=no")
    cfg = lorakit.load_config(CONFIG, overrides)
    task = get_task(cfg.task)
    cfg = build.resolve_config(cfg, task, torch.device("cpu"))
    base = build.open_base(task, cfg.model)
    data = task.prepare(cfg, base.processor)
    model = build.build_model(task, cfg, base, data.label_space)
    amp = modeling.pick_precision(cfg.train.mixed_precision, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collate = task.collate(base.processor, cfg.data, train=True)
    ds = data.splits["train"]
    model.train()
    parts: dict[str, list[float]] = {"collate": [], "forward": [], "backward": [], "optimizer": []}
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(WARMUP + n_steps):
        if i == WARMUP:
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        batch = collate(take(ds, list(range(i * BATCH, (i + 1) * BATCH))))
        t1 = time.perf_counter()
        with autocast(torch.device("cpu"), amp):
            loss = model(**batch).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i >= WARMUP:
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key].append(dt)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    total = [sum(p) for p in zip(*parts.values(), strict=True)]
    return {
        "name": name,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "step_s": statistics.median(total),
        **{f"{k}_s": statistics.median(v) for k, v in parts.items()},
        "user_s_per_step": (cpu1.ru_utime - cpu0.ru_utime) / n_steps,
        "sys_s_per_step": (cpu1.ru_stime - cpu0.ru_stime) / n_steps,
        "peak_rss_mb": common.peak_rss_mb(),
    }


def layers(quick: bool) -> dict:
    """Forward + backward (input gradient) of EfficientNet-Lite0's strided depthwise convolutions at
    batch 64 and 64 px, fp32 against bf16; median of 10 runs."""
    import torch

    shapes = [(96, 33, 3), (144, 19, 5), (240, 9, 3), (672, 7, 5)]  # channels, padded side, kernel
    out = {}
    for channels, side, kernel in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(BATCH, channels, side, side, dtype=dtype, requires_grad=True)
            w = torch.randn(channels, 1, kernel, kernel, dtype=dtype)
            times = []
            for i in range(3 + (2 if quick else 10)):
                t0 = time.perf_counter()
                torch.nn.functional.conv2d(x, w, stride=2, groups=channels).sum().backward()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            out[f"{channels}ch {side}px k{kernel} {str(dtype)[6:]}"] = statistics.median(times)
    return {"name": "layers", "layers_s": out}


def child(name: str, work: Path, overrides: list[str], quick: bool) -> None:
    common.emit(layers(quick) if name == "layers" else steps(name, quick))


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--only", nargs="*", default=["before", "dw-fp32", "now", "fp32", "layers"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.set, args.quick)
        return
    print(
        f"# bench/image_step.py: {CONFIG.name}, batch {BATCH}, median of {STEPS} steps after {WARMUP}",
        flush=True,
    )
    results = []
    for i, name in enumerate(args.only):
        r = common.run_child(
            SCRIPT, name, ["--work", f"/tmp/image-step-{i}", *(["--quick"] if args.quick else [])]
        )
        results.append(r)
        if name == "layers":
            for k, v in r["layers_s"].items():
                print(f"  strided depthwise {k:24s} {1000 * v:7.1f} ms", flush=True)
            continue
        print(
            f"{name:8s} {r['precision']:9s} step {r['step_s']:.3f} s (collate {r['collate_s']:.3f}, forward "
            f"{r['forward_s']:.3f}, backward {r['backward_s']:.3f}, optimizer {r['optimizer_s']:.3f})  "
            f"CPU per step: user {r['user_s_per_step']:.2f} s, system {r['sys_s_per_step']:.2f} s  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    steps_by = {r["name"]: r["step_s"] for r in results if "step_s" in r}
    if "before" in steps_by and "now" in steps_by:
        print(f"\nnow / before: {steps_by['now'] / steps_by['before']:.2f}x the step time", flush=True)


if __name__ == "__main__":
    main()
