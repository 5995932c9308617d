"""The process a run lives in: torchrun / accelerate ranks, stop signals, resident memory.

May import: ``lorakit.errors`` only.
"""
