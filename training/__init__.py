"""HairDiff fine-tuning: dataset checks, the training loop (accelerate), checkpoints, logs.

``hairdiff train`` is :mod:`hairdiff_cli.train`; the method's maths (soft mask, noising, losses,
augmentation) lives in :mod:`hairdiff_core`, this package only orchestrates it.
"""
