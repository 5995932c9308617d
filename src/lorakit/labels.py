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
        cls, values: Iterable[Any], names: Sequence[str] | None = None, *, key: str = "data.train"
    ) -> LabelSpace:
        """Build the label space from the training labels.

        Integer labels 0..K-1 keep their ids (named by ``names`` when given); string labels are
        sorted so that the mapping does not depend on row order.

        Raises:
            DataError: Missing labels, fewer than two classes, or ``names`` that do not fit the ids.
        """
        seen = set()
        for v in values:
            if v is None or (isinstance(v, str) and not v.strip()):
                raise DataError(f"{key}: some rows have no label; fill them in or remove those rows")
            seen.add(v)
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
            missing = sorted(str(v) for v in seen if str(v) not in names)
            if missing:
                raise DataError(
                    f"data.label_names: does not include {missing[:5]} found in {key}; list every label"
                )
            return cls(tuple(str(n) for n in names))
        return cls(tuple(sorted(str(v) for v in seen)))

    def encode(self, value: Any) -> int:
        """The id of one raw label value (an int id or a name)."""
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.num_labels:
            return value
        return self.label2id[str(value)]

    def unknown(self, values: Iterable[Any]) -> list[str]:
        """Raw values that are not in this label space (sorted, as strings)."""
        bad = set()
        for v in values:
            try:
                self.encode(v)
            except KeyError:
                bad.add(str(v))
        return sorted(bad)
