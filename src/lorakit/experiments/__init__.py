"""Experiments: the hyperparameter search on Optuna (``tuning``: ``lorakit tune``) and what a finished
study leaves in its folder (``study_report``). Each trial is an ordinary ``lorakit train`` process.

May import: the layers up to ``training`` (trackers: ``lorakit.training.tracking``).
"""
