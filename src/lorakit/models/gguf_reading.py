"""Read a GGUF file once where transformers would parse it three times.

``from_pretrained(..., gguf_file=...)`` of a Llama-family file goes through transformers' legacy GGUF
path: the config, the tokenizer and the weights each build a ``gguf.GGUFReader`` and parse every
metadata field again. For SmolLM2-135M most of that is its 49,152-string vocabulary: ~10 s of
pure-Python parsing per reader on 2 CPU cores, ~40 s for one model and tokenizer. Within
:func:`gguf_read_once` the reader of a file and its parsed metadata are built once and shared by
those calls (the same objects transformers would have built, so the same model and tokenizer).
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.RLock()  # the patch is process-wide: one block at a time


def _identity(path: Any) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def gguf_read_once() -> Iterator[None]:
    """Within the block, each GGUF file (by path, size and modification time) is parsed once."""
    try:
        import gguf
        from transformers import modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:  # no GGUF support installed: transformers will say so itself
        yield
        return
    with _lock:
        reader_cls, load = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint
        readers: dict[tuple, Any] = {}
        metadata: dict[tuple, Any] = {}

        def shared_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
            key = (_identity(path), args, tuple(sorted(kwargs.items())))
            if key not in readers:
                readers[key] = reader_cls(path, *args, **kwargs)
            return readers[key]

        def shared_load(path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
            if return_tensors or args or kwargs:  # the weights: read once anyway
                return load(path, return_tensors, *args, **kwargs)
            key = _identity(path)
            if key not in metadata:
                metadata[key] = load(path, False)
            return copy.deepcopy(metadata[key])  # callers may edit the dicts they get

        gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = shared_reader, shared_load
        try:
            yield
        finally:
            gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reader_cls, load
