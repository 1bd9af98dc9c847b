"""The package version, read from its one source, ``pyproject.toml``.

In a source tree (a ComfyUI custom_nodes checkout, a clone) the ``pyproject.toml`` beside the
package is read; in an installed wheel, the installed metadata (which the build copied from it).
In a module of its own: core modules that record the version (adapter metadata) read it from
here, not from the package's ``__init__``, whose lazy re-exports import them.
"""

from __future__ import annotations

import re
from pathlib import Path


def _read_version() -> str:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        if found:
            return found.group(1)
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("hairdiff")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _read_version()
