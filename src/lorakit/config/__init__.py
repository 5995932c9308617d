"""The run configuration: the sections every run has (``schema``), YAML loading, overrides, validation.

A task adds its own ``data:`` / ``train:`` fields by subclassing these sections in its own file; the
config layer finds a task's classes by name through the task registry (``lorakit.tasks``), which names
each task's module as a string and imports it on first use.

May import: ``lorakit.errors``, ``lorakit.files``, the task registry ``lorakit.tasks`` (its ``__init__``).
"""
