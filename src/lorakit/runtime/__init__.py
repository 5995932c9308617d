"""The process a run lives in: torchrun / accelerate ranks, stop signals, resident memory, the
libraries' progress bars.

May import: ``lorakit.errors`` only.
"""
