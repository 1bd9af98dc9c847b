"""Node tests: ComfyUI is absent; minimal stand-ins (tools/comfy_standins/comfy_stubs.py) replace the modules the nodes touch.

Everything here is fixture-scoped, so the stand-ins exist only while a test in tests/nodes/ runs
(a module-level ``sys.modules`` change in a conftest would leak into every other test of the
session). The pack is imported as an alias package ``hairdiff_pack`` whose path is the repo
root, without running the root ``__init__`` (ComfyUI's entry point), so ``nodes/`` resolves its
relative ``..hairdiff_core`` imports exactly as inside ComfyUI. Node tests use only that alias:
its ``hairdiff_core`` is a separate copy from the top-level one other tests import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The stand-ins live outside tests/: the workflow builder (--from-stubs) loads them too, and
# product code never reaches into tests/.
STANDINS = ROOT / "tools" / "comfy_standins"
ALIAS = "hairdiff_pack"


def _load_stubs():
    spec = importlib.util.spec_from_file_location("hairdiff_comfy_stubs", STANDINS / "comfy_stubs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _drop_alias() -> None:
    for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The stand-in ComfyUI (``.mm``, ``.folder_paths``, ``.ProgressBar``, ...) and the pack under it."""
    stubs = _load_stubs()
    models_dir = tmp_path_factory.mktemp("comfy_models")
    handle = stubs.install(str(models_dir))
    pack = types.ModuleType(ALIAS)
    pack.__path__ = [str(ROOT)]
    sys.modules[ALIAS] = pack
    try:
        handle.pack = pack
        handle.nodes = importlib.import_module(f"{ALIAS}.nodes")
        handle.core = importlib.import_module(f"{ALIAS}.hairdiff_core")
        handle.models_dir = models_dir
        handle.stubs = stubs
        yield handle
    finally:
        _drop_alias()
        stubs.uninstall()
        sys.modules.pop("hairdiff_comfy_stubs", None)


@pytest.fixture(autouse=True)
def _fresh_comfy_state(request):
    """Each test starts with no loaded models, no pending Cancel and no recorded progress."""
    if "comfy" not in request.fixturenames:
        yield
        return
    handle = request.getfixturevalue("comfy")
    handle.mm.current_loaded_models.clear()
    handle.mm.load_calls.clear()
    handle.mm.interrupt_processing = False
    handle.ProgressBar.instances.clear()
    handle.previewers.clear()
    yield
    handle.mm.current_loaded_models.clear()
