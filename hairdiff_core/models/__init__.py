"""Model I/O: loading SD3/SD3.5 checkpoints (shipped configs in ``configs/``), HairDiff adapters and
LoRA, memory policy (weights, offload, the VRAM estimate), compiling, the text encoders and prompt
cache, and the built-in tiny and toy models.

Importing this package imports nothing heavy: import the module you need.
"""
