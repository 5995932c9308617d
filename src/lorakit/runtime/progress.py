"""The progress bars of the libraries lorakit runs on (datasets' ``map``, transformers' weight loading,
huggingface_hub's downloads), switched off for a block and restored after it.

Each library keeps its switch in a process-wide global; :func:`progress_bars` saves the three, turns
them off while the block runs and puts back what it found, so a caller's own setting survives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """Run the block with the libraries' progress bars as they are (``show``) or all hidden.

    Args:
        show: True leaves every switch alone; False hides the bars of datasets, transformers and
            huggingface_hub until the block ends.
    """
    if show:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    was = (
        datasets.is_progress_bar_enabled(),
        hf_logging.is_progress_bar_enabled(),
        hub.are_progress_bars_disabled(),
    )
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        datasets_on, transformers_on, hub_off = was
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()
        if not hub_off:
            hub.enable_progress_bars()
