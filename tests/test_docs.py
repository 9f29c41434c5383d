"""The docs point at things that exist, and nothing points outside the repository."""

from __future__ import annotations

import glob
import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "perf" / "README.md", *(ROOT / "docs").glob("*.md")])
#: Paths of this machine or of files beside the checkout: a clone has none of them.
OUTSIDE = re.compile(r"\.\./shared|shared/design|/work/|/root/|/home/")
#: Backticked text that looks like a path but is not one (perf/README's ratio label).
NOT_PATHS = {"felix/peer"}


def test_nothing_in_the_repository_points_outside_it() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    offenders = []
    for name in filter(None, tracked):
        path = ROOT / name.decode()
        if path.suffix in (".png", ".svg", ".so") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and path.name != "test_docs.py":
                offenders.append(f"{name.decode()}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_docs_exist(doc: Path) -> None:
    text = doc.read_text()
    missing = [
        path
        for path in re.findall(r"`((?:felix|tests|perf|docker|docs)/[^`\s]*)`", text)
        if path not in NOT_PATHS and not glob.glob(str(ROOT / path.rstrip(".,")))
    ]
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_names_in_docs_resolve(doc: Path) -> None:
    unresolved = []
    for dotted in set(re.findall(r"`(felix(?:\.[A-Za-z_]\w*)+)`", doc.read_text())):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            break
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                unresolved.append(dotted)
                break
            obj = getattr(obj, attr)
    assert unresolved == []
