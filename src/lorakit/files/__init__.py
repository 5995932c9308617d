"""Files on disk, for every layer: ``pkg://`` locations, atomic writes, a full disk, damaged weight files.

May import: ``lorakit.errors`` only.
"""
