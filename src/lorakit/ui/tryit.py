"""The "try it" panel's model side: the engine of ``lorakit serve``, one per adapter tried, the most
recently used few kept loaded.

Adapters that answer ``predict`` give their task's prediction records (labels with probabilities,
labelled spans); adapters that answer ``generate`` answer a chat message twice, with the adapter and with
the bare base model (the engine's ``base``), so the page can show the before / after.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lorakit.errors import DataError
from lorakit.serving.engine import BASE
from lorakit.tasks.base import GenerateOptions

ANSWER_TIMEOUT = 300.0


class Playground:
    """Loaded engines by adapter folder, least recently used closed first.

    Args:
        keep: Engines kept loaded (each holds a base model).
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._engines: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def engine(self, adapter_dir: Path) -> Any:
        """The engine serving ``adapter_dir`` (loaded on first use; reloaded when the folder changed)."""
        from lorakit.serving import Engine

        key = (str(adapter_dir), adapter_dir.stat().st_mtime)
        with self._lock:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key]
            engine = Engine(
                [f"adapter={adapter_dir}"], allow_base=True, merge_single=False, on_demand=False, device="cpu"
            )
            self._engines[key] = engine
            while len(self._engines) > self.keep:
                _, old = self._engines.popitem(last=False)
                old.close()
            return engine

    def widget(self, adapter_dir: Path) -> str:
        """The "try it" widget of the adapter's task (``Task.try_widget``)."""
        return self.engine(adapter_dir).task.try_widget

    def predict(self, adapter_dir: Path, items: list[str], top_k: int = 5) -> list[dict[str, Any]]:
        """The task's prediction records for inputs as the page sends them (texts, or images as data:
        URLs), through the serving engine.

        Raises:
            DataError: No inputs, or inputs the task cannot read.
        """
        if not items:
            raise DataError("nothing to predict: type a text (or drop an image)")
        engine = self.engine(adapter_dir)
        inputs = engine.task.decode_inputs(items)
        rows = engine.encode("adapter", inputs)
        outputs = engine.submit("adapter", rows).result(timeout=ANSWER_TIMEOUT)
        return engine.records("adapter", inputs, rows, outputs, top_k)

    def chat(self, adapter_dir: Path, message: str, max_new_tokens: int = 64) -> dict[str, str]:
        """The adapter's and the base model's answers to one user message (greedy decoding)."""
        if not message.strip():
            raise DataError("nothing to answer: type a message")
        engine = self.engine(adapter_dir)
        prompt = engine.encode_chat("adapter", [{"role": "user", "content": message}])
        options = GenerateOptions(max_new_tokens=max_new_tokens)  # greedy
        adapted = engine.submit("adapter", [prompt], options)
        base = engine.submit(BASE, [prompt], options)
        return {
            "adapter": adapted.result(timeout=ANSWER_TIMEOUT)[0],
            "base": base.result(timeout=ANSWER_TIMEOUT)[0],
        }

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
