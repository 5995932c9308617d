"""Data: reading files and packaged data into ``datasets`` and splitting them (``sources``), images and
their transforms (``images``), label spaces (``labels``), and batches (``batching``).

May import: ``lorakit.errors``, ``lorakit.files``, ``lorakit.runtime``, ``lorakit.config``.
"""
