"""Inside ComfyUI the pack is imported by file path, and ``hairdiff_core`` is not a top-level package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = f"""
import importlib, sys, types
sys.path = [p for p in sys.path if p not in ('', '.', {str(ROOT)!r})]
pack = types.ModuleType('custom_nodes_hairdiff'); pack.__path__ = [{str(ROOT)!r}]
sys.modules['custom_nodes_hairdiff'] = pack
# Block the top-level name even where the pack is pip-installed (editable installs add a finder):
# any absolute "hairdiff_core" import inside the core then fails, as it would in ComfyUI.
sys.modules['hairdiff_core'] = None
L = importlib.import_module('custom_nodes_hairdiff.hairdiff_core.models.families')
for name in L.TRANSFORMER_CONFIG_FILES.values():
    L.shipped_config(name)
L.shipped_config(L.VAE_CONFIG_FILE)
print('ok')
"""


def test_shipped_configs_load_when_the_core_is_a_subpackage(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"},
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
