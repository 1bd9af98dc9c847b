"""The method itself: input-channel surgery, the soft mask, flow-matching schedule, the sampler,
reference attention and the training losses. Depends only on the package's basics (errors,
defaults, imageops); nothing here loads files or models.

Importing this package imports nothing heavy: import the module you need.
"""
