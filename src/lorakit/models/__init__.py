"""Base models and LoRA: locating a base model, choosing target modules, wrapping it with peft, devices
and precision (``modeling``); backbones that are not in Hugging Face format (``zoo``).

May import: ``lorakit.errors``, ``lorakit.files``, ``lorakit.runtime``, ``lorakit.config``, ``lorakit.data``.
"""
