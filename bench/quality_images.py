"""Adaptation quality on images: lorakit's defaults against full fine-tuning,
EfficientNet-Lite0 on Fashion-MNIST.

One command, one run, the same data, model, seed and budget for every configuration: 10,000
Fashion-MNIST training images (seeded sample of the official training split), one epoch, 64x64
inputs, random resized crop (area 0.7-1) + flip on training images only, the ImageNet
EfficientNet-Lite0 of lorakit's model zoo with a new 10-class head; accuracy on 2,000 images of the
official test split (1,000 further training images are lorakit's validation split).

  full:LR    full fine-tuning: every weight trained (AdamW at LR, linear warm-up 6% and decay, weight
             decay 0.01 except biases / norms, gradient clipping 1.0: lorakit's optimiser settings),
             written as a plain PyTorch loop over lorakit's data pipeline and model construction, so
             that only the training method differs
  full-bf16:LR the same under bf16 autocast (as lorakit trains on a CPU with native bf16)
  lorakit    `lorakit train` with a config naming only data, model and budget (its defaults)
  loha, loha-eff, lokr, lokr-eff, lora-ranks
             the same with one lora setting changed (METHODS below): LoHa at r=4 (the parameters of
             LoRA's r=8 per layer), LoKr at r=8, each with and without effective_conv2d (the Tucker
             form of k x k kernels; the -eff runs also adapt the depthwise convolutions of the stride-1
             blocks), and LoRA with rank 32 on the widest layer

    .venv/bin/python bench/quality_images.py  # full at 3e-4 and 1e-3, lorakit (~15 min on 2 cores)
    .venv/bin/python bench/quality_images.py --only lorakit --variant "r16=lora.r=16,lora.alpha=32"

Each configuration runs in its own process, one after the other.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SCRIPT = Path(__file__).resolve()
FMNIST = Path("/usr/share/datasets/fashion-mnist")
LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
N_TRAIN, N_VAL, N_TEST = 10_000, 1_000, 2_000
#: The adapter-method configurations (issue 40), as overrides of lorakit's defaults.
#: lorakit's default targets plus the depthwise 3x3 / 5x5 convolutions of the stride-1 blocks (the strided
#: ones pad their input themselves, which an adapted convolution cannot do).
DEPTHWISE = (
    "lora.target_modules=(?!.*_blocks\\.(?:1|3|5|11)\\._depthwise_conv$)"
    "(?:.*\\.)?(?:_expand_conv|_depthwise_conv|_project_conv|_conv_head)"
)
METHODS: dict[str, list[str]] = {
    "loha": ["lora.method=loha", "lora.r=4", "lora.alpha=8"],
    "loha-eff": ["lora.method=loha", "lora.r=4", "lora.alpha=8", "lora.effective_conv2d=true", DEPTHWISE],
    "lokr": ["lora.method=lokr", "lora.r=8", "lora.alpha=16"],
    "lokr-eff": ["lora.method=lokr", "lora.r=8", "lora.alpha=16", "lora.effective_conv2d=true", DEPTHWISE],
    "lora-ranks": ["lora.rank_pattern={_conv_head: 32}", "lora.alpha_pattern={_conv_head: 64}"],
}


def run_config(work: Path, quick: bool) -> Path:
    """Data, model and budget; everything else is lorakit's default."""
    import yaml

    n_train, n_eval = (256, 64) if quick else (N_TRAIN, N_TEST)
    cfg = {
        "task": "image-classification",
        "data": {
            "train": str(FMNIST / "train-images-idx3-ubyte.gz"),
            "test": str(FMNIST / "t10k-images-idx3-ubyte.gz"),
            "label_names": LABELS,
            "validation_size": n_eval // 2 if quick else N_VAL,
            "max_train_samples": n_train,
            "max_eval_samples": n_eval,
            "image_size": 64,
            "crop_pct": 1.0,
            "augment": {"crop_scale": [0.7, 1.0]},
            "seed": common.SEED,
        },
        "model": {"name_or_path": "zoo:efficientnet-lite0"},
        "train": {"epochs": 1, "seed": common.SEED},
        "output": {"dir": str(work / "run"), "overwrite": True, "report": False, "tensorboard": False},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "lorakit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def full_fine_tuning(config: Path, lr: float, bf16: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    """Every weight trained, with lorakit's data, model construction and optimiser settings; with
    ``bf16``, forward passes (training and evaluation) under bf16 autocast, as lorakit's on a CPU with
    native bf16, so that the precision is the same on both sides."""
    import torch
    from transformers import get_scheduler

    import lorakit
    from lorakit.data.batching import autocast, evaluate_model, take, train_batches
    from lorakit.models import modeling
    from lorakit.tasks import get_task
    from lorakit.training import optimizer_steps, param_groups, set_seed

    t0 = time.perf_counter()
    cfg = lorakit.load_config(config, [*overrides, f"train.learning_rate={lr}"])
    t = cfg.train
    task = get_task(cfg.task)
    model_path = modeling.resolve_model_path(cfg.model)
    processor = task.load_processor(cfg.model, model_path)
    data = task.prepare(cfg, processor)
    set_seed(t.seed)
    base, _ = task.load_model(cfg.model, model_path, data.label_space, cfg.data)
    model = task.prepare_model(base)
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        param_groups(model, t, head_modules=[]), lr=lr, betas=t.adam_betas
    )  # lorakit's weight-decay groups
    train_ds = data.splits["train"]
    _, total_steps = optimizer_steps(len(train_ds), t)
    scheduler = get_scheduler(
        t.scheduler,
        optimizer,
        num_warmup_steps=round(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    collate = task.collate(processor, cfg.data, train=True)
    model.train()
    cpu, amp = torch.device("cpu"), (torch.bfloat16 if bf16 else None)
    t_train = time.perf_counter()
    for idx in train_batches([1] * len(train_ds), t.batch_size, seed=t.seed, epoch=0, group_by_length=False)[
        :total_steps
    ]:
        with autocast(cpu, amp):
            loss = model(**collate(take(train_ds, idx))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - t_train
    logits, labels, _ = evaluate_model(
        model,
        data.splits["test"],
        task.collate(processor, cfg.data),
        batch_size=t.eval_batch_size or t.batch_size,  # unset = batch_size on CPUs, as in lorakit
        device=cpu,
        amp=amp,
    )
    total = sum(p.numel() for p in model.parameters())
    return {
        "accuracy": float((logits.argmax(-1) == labels).mean()),
        "seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds,
        "steps": total_steps,
        "trainable": total,
        "total": total,
        "peak_rss_mb": common.peak_rss_mb(),
    }


def child(name: str, work: Path, overrides: list[str], quick: bool) -> None:
    config = run_config(work, quick)
    if name.startswith(("full:", "full-bf16:")):
        kind, lr = name.split(":", 1)
        r = full_fine_tuning(config, float(lr), bf16=kind == "full-bf16", overrides=tuple(overrides))
    else:
        import lorakit

        overrides = METHODS.get(name, []) + overrides
        t0 = time.perf_counter()
        res = lorakit.train(config, overrides=overrides, progress=False)
        r = {
            "accuracy": res.test["accuracy"],
            "seconds": time.perf_counter() - t0,
            "trainable": res.trainable_params,
            "total": res.total_params,
            "steps": res.history[-1]["step"] if res.history else None,
            "peak_rss_mb": common.peak_rss_mb(),
        }
    common.emit({"name": name, "overrides": overrides, **r})


def print_gaps(results: list[dict]) -> None:
    """Each configuration against the best full fine-tuning of its seed; with several seeds, also the
    mean accuracy and mean gap of each configuration over the seeds."""
    by_seed: dict[str, list[dict]] = {}
    for r in results:
        by_seed.setdefault(r["name"].partition("@")[2], []).append(r)
    gaps: dict[str, list[float]] = {}
    for rows in by_seed.values():
        full = [r for r in rows if r["name"].startswith(("full:", "full-bf16:"))]
        if not full:
            continue
        best = max(full, key=lambda r: r["accuracy"])
        print(f"\ngaps to the best full fine-tuning ({best['name']}; accuracy points; time as a ratio):")
        for r in rows:
            gap = 100 * (r["accuracy"] - best["accuracy"])
            gaps.setdefault(r["name"].partition("@")[0], []).append(gap)
            if r is not best:
                print(f"  {r['name']:28s} {gap:+5.1f} points, {r['seconds'] / best['seconds']:.2f}x the time")
    if len(by_seed) > 1:
        accs: dict[str, list[float]] = {}
        for r in results:
            accs.setdefault(r["name"].partition("@")[0], []).append(100 * r["accuracy"])
        print(f"\nmean over seeds {', '.join(by_seed)} (accuracy; gap to that seed's best full fine-tuning):")
        for name, a in accs.items():
            g = gaps.get(name)
            gap = f"{sum(g) / len(g):+5.1f} points" if g else ""
            print(f"  {name:28s} {sum(a) / len(a):5.1f}% over {len(a)}  {gap}")


def main() -> None:
    ran = common.run_main(
        SCRIPT,
        __doc__,
        child,
        only=["full:3e-4", "full:1e-3", "lorakit"],
        only_help="which configurations to run: full:LR (full fine-tuning at that learning rate, fp32), "
        "full-bf16:LR (the same under bf16 autocast), lorakit, " + ", ".join(METHODS),
        header=f"# bench/quality_images.py: {N_TRAIN} Fashion-MNIST training images, 1 epoch, 64 px, "
        f"EfficientNet-Lite0 (ImageNet); accuracy on {N_TEST} official test images",
        quick_header="# bench/quality_images.py --quick: 256 training images, a smoke "
        "test, not a measurement",
    )
    if ran is None:
        return
    args, results = ran
    print_gaps(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
