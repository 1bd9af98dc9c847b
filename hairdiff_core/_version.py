"""The package version, in a module of its own: core modules that record it (adapter metadata)
read it from here, not from the package's ``__init__``, whose lazy re-exports import them."""

__version__ = "0.1.0"
