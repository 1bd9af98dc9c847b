"""Data: image files in and out, dataset preparation (mattes, synthesised sketches), datasets and
augmentation for training.

Importing this package imports nothing heavy: import the module you need.
"""
