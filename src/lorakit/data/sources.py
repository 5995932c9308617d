"""Reading tabular data into ``datasets`` and splitting it, for every task.

``datasets`` does the reading, caching and splitting; this module adds what it lacks: one entry point
for files, globs, ``pkg://`` paths and Hub names; row filters from the config; column checks that
name the columns that *are* there; seeded validation / test splits; and errors a person can act on.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from lorakit.config.schema import DataConfig
from lorakit.data import records
from lorakit.errors import DataError, LorakitError
from lorakit.files.paths import looks_like_local_path, resolve_location

log = logging.getLogger(__name__)

_FORMAT_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}


def read_source(
    location: str, fmt: str = "auto", *, key: str = "data.train", hub_split: str = "train"
) -> Dataset:
    """Read one data source into a :class:`datasets.Dataset`.

    Args:
        location: A file (csv / tsv / json / jsonl, plain or .gz / .bz2 / .xz compressed, or parquet), a
            glob, a folder of such files (shards) or of images, a ``pkg://`` path or a Hub dataset name.
        fmt: ``auto`` (by extension), ``csv``, ``json``, ``jsonl``, ``parquet`` or ``hub``.
        key: The config key the location came from, for error messages.
        hub_split: The split to take from a Hub dataset.

    Returns:
        The rows, untouched.

    Raises:
        DataError: The file is missing, empty, unreadable (the broken record named by its line) or of an
            unknown format, or the Hub is out of reach.
    """
    try:
        resolved = resolve_location(location, what=key)
    except LorakitError as exc:
        raise DataError(str(exc)) from None
    if fmt == "hub" or (fmt == "auto" and not looks_like_local_path(resolved)):
        return _read_hub(resolved, key=key, split=hub_split)

    from lorakit.data import images

    folder = Path(resolved).expanduser()
    shards = _shards(folder, key=key) if folder.is_dir() and fmt != "imagefolder" else []
    if fmt == "imagefolder" or (folder.is_dir() and not shards):
        if not folder.is_dir():
            raise DataError(f"{key}: image folder '{location}' does not exist; check the path")
        return images.read_image_folder(folder, key=key)
    files = shards or sorted(glob.glob(str(folder))) or []
    if files and (fmt == "idx" or (fmt == "auto" and images.is_idx_file(files[0]))):
        return images.read_idx(files[0], key=key)
    if not files:
        raise DataError(
            f"{key}: file '{location}' does not exist; check the path (relative paths start "
            "from the current folder)"
        )
    builder = _FORMAT_BUILDERS.get(fmt) if fmt != "auto" else _builder_of(files, key=key)
    for f in files:
        if Path(f).stat().st_size == 0:
            raise DataError(f"{key}: file '{f}' is empty; it needs a header row and at least one example")
    delimiter = "\t" if records.split_suffix(files[0])[0] == ".tsv" else ","
    ds = _load_files(files, builder, delimiter, location=location, key=key)
    if len(ds) == 0:
        raise DataError(f"{key}: '{location}' holds no rows; add examples below the header")
    if ds.column_names and ds.column_names[0].startswith("\ufeff"):  # a byte-order mark read as text
        ds = ds.rename_column(ds.column_names[0], ds.column_names[0].lstrip("\ufeff"))
    return ds


def _shards(folder: Path, *, key: str) -> list[str]:
    """The data files of a folder of shards (``part-0.csv``, ...; Spark's ``_SUCCESS`` and other marker
    files ignored), or [] for a folder of images (sub-folders per class).

    Raises:
        DataError: The folder holds data files of more than one format.
    """
    files = sorted(
        f for f in folder.iterdir() if not f.name.startswith((".", "_")) and records.is_data_file(f)
    )
    kinds = sorted({records.split_suffix(f)[0] for f in files})
    if len(kinds) > 1:
        raise DataError(
            f"{key}: folder '{folder}' mixes data files of several formats ({', '.join(kinds)}); "
            "keep one format per folder, or name the files with a glob (e.g. folder/*.csv)"
        )
    return [str(f) for f in files]


def _builder_of(files: list[str], *, key: str) -> str:
    """The ``datasets`` builder of the files by their suffix.

    Raises:
        DataError: A spreadsheet or a file of no known format, or files of several formats.
    """
    kinds = {records.split_suffix(f) for f in files}
    fmt, comp = records.split_suffix(files[0])
    if fmt in records.SPREADSHEETS:
        raise DataError(
            f"{key}: '{files[0]}' is a spreadsheet, which lorakit does not read; save the sheet as CSV "
            f"(UTF-8) and point to that (readable: {records.READABLE})"
        )
    builder = records.BUILDERS.get(fmt)
    if builder is None or (builder == "parquet" and comp):
        raise DataError(
            f"{key}: cannot tell the format of '{files[0]}'; use {records.READABLE}, or set data.format"
        )
    if len({records.BUILDERS.get(f) for f, _ in kinds}) > 1:
        raise DataError(f"{key}: the files of the glob have several formats; match files of one format")
    return builder


def _load_files(files: list[str], builder: str, delimiter: str, *, location: str, key: str) -> Dataset:
    kwargs: dict[str, Any] = {"delimiter": delimiter} if delimiter != "," else {}
    quiet = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(
        datasets.logging.CRITICAL
    )  # its builders log "Failed to read file" before raising; reported below
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        if "corresponds to no data" in str(exc):
            raise DataError(f"{key}: '{location}' holds no rows; add examples below the header") from None
        if _caused_by(exc, UnicodeDecodeError):
            raise DataError(
                f"{key}: '{location}' is not UTF-8 text; convert it (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        bad = records.find_bad_record(files, builder, delimiter)
        if bad is not None:
            raise DataError(bad.message(key)) from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{key}: could not read '{location}' as {builder}: {reason[:300]}") from None
    finally:
        datasets.logging.set_verbosity(quiet)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _read_hub(name: str, *, key: str, split: str) -> Dataset:
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        text = str(exc)
        offline = any(
            s in text
            for s in ("offline", "Connection", "resolve", "Max retries", "couldn't reach", "Couldn't reach")
        )
        if offline:
            raise DataError(
                f"{key}: '{name}' is not a local file and the Hugging Face Hub cannot be reached (offline?); "
                "download the data or point to a local csv/json/jsonl/parquet file"
            ) from None
        raise DataError(
            f"{key}: could not load Hub dataset '{name}' (split '{split}'): "
            f"{text.splitlines()[0][:300] if text else type(exc).__name__}"
        ) from None
    if not isinstance(ds, Dataset):
        raise DataError(f"{key}: Hub dataset '{name}' did not give a single split; set data.hub_split")
    return ds


def require_columns(
    ds: Dataset, columns: list[str], *, key: str, data_cfg: DataConfig | None = None, field: str = ""
) -> None:
    """Raise a :class:`DataError` naming the missing columns, the ones that exist and the settings that
    name them.

    Args:
        ds: The rows.
        columns: The columns they must have.
        key: The config key of the source, for the message.
        data_cfg: The task's data section: the hint names its fields that ask for the missing columns
            (``data.rejected_column`` for a preference file, ``data.tags_column`` for token tags).
        field: The setting that asked for ``columns`` when it is not a column field (``data.where``).
    """
    missing = [c for c in columns if c not in ds.column_names]
    if not missing:
        return
    settings = [field] if field else column_settings(data_cfg, missing) if data_cfg is not None else []
    hint = (
        f"; rename the column{'s' if len(missing) > 1 else ''} or set {' / '.join(settings)}"
        if settings
        else ""
    )
    raise DataError(
        f"{key}: column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)} not "
        f"found; the data has {', '.join(ds.column_names)}{hint}"
    )


def column_settings(data_cfg: DataConfig, columns: list[str]) -> list[str]:
    """The ``data.*`` settings of ``data_cfg`` that ask for ``columns``: a field whose value is one of
    them (``rejected_column: rejected``) or a template that reads it (``instruction_template``)."""
    found = []
    for name, value in data_cfg:
        if isinstance(value, str) and (
            value in columns or any("{" + c + end in value for c in columns for end in "}!:")
        ):
            found.append(f"data.{name}")
    return found


def filter_rows(ds: Dataset, where: dict[str, Any], *, key: str) -> Dataset:
    """Keep the rows whose columns equal the values in ``where`` (``data.where``)."""
    if not where:
        return ds
    require_columns(ds, list(where), key=key, field="data.where")
    wanted = {col: (val if isinstance(val, list) else [val]) for col, val in where.items()}
    kept = ds.filter(lambda row: all(row[c] in vals for c, vals in wanted.items()), desc="data.where")
    if len(kept) == 0:
        seen = {c: sorted({str(v) for v in ds.unique(c)})[:10] for c in where}
        raise DataError(f"{key}: no rows match data.where {where}; values present: {seen}")
    return kept


def _count(size: float, n: int) -> int:
    return int(size) if size >= 1 else max(1, round(size * n))


def _split_off(
    ds: Dataset, size: float, seed: int, stratify: str | None, *, key: str
) -> tuple[Dataset, Dataset]:
    n_out = _count(size, len(ds))
    if n_out >= len(ds):
        raise DataError(
            f"{key}: asks for {n_out} held-out rows but only {len(ds)} are left for training; lower it"
        )
    try:
        parts = ds.train_test_split(test_size=n_out, seed=seed, stratify_by_column=stratify)
    except ValueError:
        # Stratification needs >= 2 rows per class in each part; fall back to a plain seeded split.
        parts = ds.train_test_split(test_size=n_out, seed=seed)
    return parts["train"], parts["test"]


def _sample(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def build_splits(
    cfg: DataConfig,
    *,
    columns: list[str],
    encode: Callable[[Dataset, str], Dataset] | None = None,
    stratify: str | None = None,
    reader: Callable[[str, str], Dataset] | None = None,
) -> DatasetDict:
    """Read train / validation / test as the config says, filtered, checked, encoded and split.

    Args:
        cfg: The data section.
        columns: Columns every source must have.
        encode: The task's ``(dataset, config_key) -> dataset`` step (e.g. labels to ids), applied to
            every source before splitting so that a split can be stratified on its output.
        stratify: A ClassLabel column (made by ``encode``) to stratify seeded splits on.
        reader: The task's ``(location, config_key) -> dataset`` reader, for tasks that read formats of
            their own (CoNLL files, say); default :func:`read_source` as ``cfg`` says.

    Returns:
        A DatasetDict with ``train``, ``validation`` and, when configured, ``test``.

    Raises:
        DataError: A source cannot be read, lacks a column, or is too small to split.
    """

    def load(location: str, key: str) -> Dataset:
        if reader is not None:
            ds = reader(location, key)
        else:
            ds = read_source(location, cfg.format, key=key, hub_split=cfg.hub_split)
        ds = filter_rows(ds, cfg.where, key=key)
        require_columns(ds, columns, key=key, data_cfg=cfg)
        return encode(ds, key) if encode else ds

    train = load(cfg.train, "data.train")
    test = load(cfg.test, "data.test") if cfg.test else None
    if test is None and cfg.test_size > 0:
        train, test = _split_off(train, cfg.test_size, cfg.seed, stratify, key="data.test_size")
    if cfg.validation:
        validation = load(cfg.validation, "data.validation")
    else:
        train, validation = _split_off(
            train, cfg.validation_size, cfg.seed + 1, stratify, key="data.validation_size"
        )

    splits = {
        "train": _sample(train, cfg.max_train_samples, cfg.seed),
        "validation": _sample(validation, cfg.max_eval_samples, cfg.seed),
    }
    if test is not None:
        splits["test"] = _sample(test, cfg.max_eval_samples, cfg.seed)
    return DatasetDict(splits)
