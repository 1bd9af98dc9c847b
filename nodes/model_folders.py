"""Model folders: ``models/hairdiff`` for adapters, and the file lists and paths the nodes offer.

The models themselves are ComfyUI's own (its loaders); HairDiff adds patches to them.
"""

from __future__ import annotations

import os

from .convert import node_error

MODEL_FOLDER = "hairdiff"


def register_model_folder() -> None:
    """Register ``models/hairdiff`` (adapters), keeping any paths the user configured for it."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    if MODEL_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[MODEL_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(exts) | {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], {".safetensors"})


def safetensors_in(folder: str) -> list[str]:
    """'<folder>/<name>' of every safetensors file in one of ComfyUI's model folders."""
    import folder_paths

    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [f"{folder}/{n}" for n in names if n.lower().endswith((".safetensors", ".sft"))]


def resolve(choice: str, node: str, input_name: str) -> str:
    """'<folder>/<name>' as ``safetensors_in`` lists it -> a full path."""
    import folder_paths

    folder, _, name = choice.partition("/")
    if not name:
        raise node_error(node, input_name, f"{choice!r} is not a model file choice", "pick one from the list")
    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except (FileNotFoundError, KeyError) as exc:
        raise node_error(node, input_name, f"{choice!r} not found ({exc})", "refresh the node list (press R)") from exc
