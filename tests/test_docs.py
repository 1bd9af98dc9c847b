"""The docs: every relative link resolves, the README stays a front door, and its commands are
the ones CI runs."""

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without code blocks and inline code (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = []
    for ch in text:
        if ch in " -_":
            kept.append("-" if ch == " " else ch)
        elif unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept)


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(_prose(path.read_text(encoding="utf-8")))]


def test_the_docs_exist():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    for page in ("comfyui", "cli", "data", "training", "small-gpus", "reference-attention", "evaluation", "errors"):
        assert f"docs/{page}.md" in names
    for page in ("architecture", "invariants", "benchmarks", "gpu-checks"):
        assert f"docs/dev/{page}.md" in names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    bad = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif not dest.resolve().is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_link_checker_sees_links_and_anchors():
    """The checker itself: a link with a title, an image, an anchor with punctuation."""
    text = 'See [a](docs/cli.md#prompts-colour-and-texture-in-words "t") and ![i](x%20y.png) `[no](z.md)`'
    assert [m.group(1) for m in LINK.finditer(_prose(text))] == [
        "docs/cli.md#prompts-colour-and-texture-in-words",
        "x%20y.png",
    ]
    assert _slug("Training: `hairdiff train`") == "training-hairdiff-train"
    assert _slug("Several GPUs (A100s): plain data parallel") == "several-gpus-a100s-plain-data-parallel"


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    first_screen = "\n".join(lines[:60]).lower()
    assert "no trained sd3.5 adapter is published" in first_screen
    assert "custom_nodes" in first_screen


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def test_the_readme_commands_are_the_ones_ci_runs():
    """The Quick start's two commands: the demo (the package install plus `hairdiff demo`, a real
    subcommand) and the test command, byte for byte the one `.ci/run` runs after installing torch."""
    quick = _section(README.read_text(encoding="utf-8"), "Quick start (fresh machine)")
    blocks = _bash_blocks(quick)
    assert len(blocks) == 2, "Quick start should hold two commands: the demo and the tests"
    demo, tests = blocks
    assert "hairdiff demo --out hairdiff_demo" in demo
    assert "python3 -m pip install -e . && hairdiff demo" in demo

    ci = [ln for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if ln.startswith("python3 ")]
    assert len(ci) == 1, ".ci/run should run one command line"
    install_torch, _, rest = ci[0].partition(" && ")
    assert install_torch.startswith("python3 -m pip install torch==")
    assert tests.strip() == rest, "README's test command differs from the one .ci/run runs"
    assert "torch==" + install_torch.split("torch==")[1] in demo, "README and .ci/run install different torch versions"

    from hairdiff_cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_one_version():
    """The version is declared in pyproject.toml; the package reports the same one."""
    import hairdiff_core

    declared = _pyproject()["project"]["version"]
    assert hairdiff_core.__version__ == declared
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {declared}" in changelog


def test_the_registry_icon_is_in_the_repository():
    from PIL import Image

    comfy = _pyproject()["tool"]["comfy"]
    icon = comfy["Icon"]
    m = re.match(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$", icon)
    path = ROOT / (m.group(1) if m else icon)
    assert path.is_file(), f"[tool.comfy] Icon names {icon}, but {path.relative_to(ROOT)} is not in the repository"
    with Image.open(path) as im:
        assert im.size[0] == im.size[1] and 100 <= im.size[0] <= 800
    assert path.stat().st_size < 100_000


def test_the_version_is_written_once():
    """pyproject.toml is the one place: no module writes a version string of its own."""
    import re

    declared = _pyproject()["project"]["version"]
    for path in (ROOT / "hairdiff_core").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"__version__\s*=\s*[\"']", text), path
        assert f'"{declared}"' not in text, path
