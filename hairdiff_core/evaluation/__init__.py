"""Evaluation: the metrics and the evaluation run over a prepared dataset.

Importing this package imports nothing heavy: import the module you need.
"""
