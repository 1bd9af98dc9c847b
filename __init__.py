"""ComfyUI entry point of the HairDiff pack (V3 node API: one ``comfy_entrypoint``, no V1 mappings).

Outside ComfyUI (pip install, the CLI, pytest) there is nothing to register, and importing
this file must not fail or pull in ComfyUI.
"""

try:
    import comfy_api.latest  # noqa: F401  # present only inside ComfyUI
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
