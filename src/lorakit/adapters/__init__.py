"""The adapter folder, the contract between every stage: writing and reading it (``folder``, the one
owner of ``lorakit.json``), building a model from it (``build``), its model card (``card``), importing a
plain-peft folder (``importing``), the local registry (``registry``) and the Hub (``hub``).

May import: every layer below it (``errors``, ``files``, ``runtime``, ``config``, ``data``, ``models``,
``tasks``).
"""
