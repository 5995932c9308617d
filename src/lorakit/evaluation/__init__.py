"""Scoring a finished adapter (``scoring``: ``lorakit eval``) and the HTML report with its plots
(``report``).

May import: the layers up to ``adapters``.
"""
