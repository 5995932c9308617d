"""The label space of a classification task: id2label / label2id, stored with every adapter."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.errors import DataError


@dataclass(frozen=True)
class LabelSpace:
    """Class names in id order. ``labels[i]`` is the name of class id ``i``."""

    labels: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        return {"id2label": {str(i): n for i, n in enumerate(self.labels)}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelSpace:
        id2label = d["id2label"]
        return cls(tuple(id2label[str(i)] for i in range(len(id2label))))

    @classmethod
    def infer(
        cls,
        values: Iterable[Any],
        names: Sequence[str] | None = None,
        *,
        key: str = "data.train",
        notes: list[str] | None = None,
    ) -> LabelSpace:
        """Build the label space from the training labels.

        Integer labels 0..K-1 keep their ids (named by ``names`` when given); string labels are
        sorted so that the mapping does not depend on row order. Surrounding whitespace is not part
        of a label (``" positive"`` is ``"positive"``).

        Args:
            values: The training rows' labels.
            names: ``data.label_names``, the names of integer ids.
            key: The config key the labels came from, for messages.
            notes: Receives warnings for the user: whitespace stripped, labels that differ only by case.

        Returns:
            The label space.

        Raises:
            DataError: Missing labels, fewer than two classes, or ``names`` that do not fit the ids.
        """
        seen = set()
        padded: set[str] = set()
        for v in values:
            if v is None or (isinstance(v, str) and not v.strip()):
                raise DataError(f"{key}: some rows have no label; fill them in or remove those rows")
            if isinstance(v, str) and v != v.strip():
                padded.add(v)
                v = v.strip()
            seen.add(v)
        if notes is not None:
            notes.extend(label_notes(padded, seen, key=key))
        if len(seen) < 2:
            only = next(iter(seen)) if seen else None
            raise DataError(
                f"{key}: found a single class ({only!r}); classification needs at least two labels"
            )
        if all(isinstance(v, int) and not isinstance(v, bool) for v in seen):
            ids = sorted(seen)
            if ids[0] < 0:
                raise DataError(f"{key}: integer labels must be 0..K-1, found {ids[0]}")
            k = ids[-1] + 1
            if names is not None:
                if len(names) < k:
                    raise DataError(
                        f"data.label_names: has {len(names)} names but labels go up to {ids[-1]}; "
                        "give one name per id"
                    )
                return cls(tuple(str(n) for n in names))
            return cls(tuple(str(i) for i in range(k)))
        if names is not None:
            names = [n.strip() if isinstance(n, str) else n for n in names]
            missing = sorted(str(v) for v in seen if str(v) not in names)
            if missing:
                raise DataError(
                    f"data.label_names: does not include {missing[:5]} found in {key}; list every label"
                )
            return cls(tuple(str(n) for n in names))
        return cls(tuple(sorted(str(v) for v in seen)))

    def encode(self, value: Any) -> int:
        """The id of one raw label value (an int id or a name; surrounding whitespace is ignored)."""
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.num_labels:
            return value
        return self.label2id[str(value).strip()]

    def unknown(self, values: Iterable[Any]) -> list[str]:
        """Raw values that are not in this label space (sorted, as strings)."""
        bad = set()
        for v in values:
            try:
                self.encode(v)
            except KeyError:
                bad.add(str(v))
        return sorted(bad)


def label_notes(padded: set[str], labels: set[Any], *, key: str) -> list[str]:
    """Warnings about label spellings: whitespace that was stripped, names that differ only by case.

    Args:
        padded: The raw labels that had surrounding whitespace.
        labels: The labels after stripping.
        key: The config key the labels came from.

    Returns:
        One line per kind of problem found (none when the labels are clean).
    """
    out = []
    if padded:
        shown = ", ".join(repr(v) for v in sorted(padded)[:3])
        out.append(
            f"{key}: {len(padded)} label spelling(s) had surrounding whitespace ({shown}); it was "
            "stripped, so each is one class with its stripped name"
        )
    by_case: dict[str, list[str]] = {}
    for v in labels:
        if isinstance(v, str):
            by_case.setdefault(v.casefold(), []).append(v)
    clashes = [sorted(group) for group in by_case.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" and ".join(repr(v) for v in group) for group in sorted(clashes)[:3])
        out.append(
            f"{key}: labels {shown} differ only by case and are trained as separate classes; if "
            "they mean the same, make them one spelling in the data"
        )
    return out
