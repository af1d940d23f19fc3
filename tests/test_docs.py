"""The docs stand alone: a user reads them in a clone or an installed wheel, with nothing beside it.

Every repository path the README and docs/ name must exist, and no tracked file may send the reader
to a design document that lives outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: design notes the project was started from, which are not shipped
OUTSIDE = ("DESIGN.md", "RABBITMQ.md", "STYLE.md", "../shared/")
PATH = re.compile(r"(?<![\w/.-])((?:docs|deploy|bench|examples|scripts|tests)/[\w./-]*\w)")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def _docs() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_tracked_file_points_outside_the_repository() -> None:
    hits = []
    for path in _tracked():
        if path.name == Path(__file__).name or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (images, archives)
        hits += [f"{path.relative_to(ROOT)}: {word}" for word in OUTSIDE if word in text]
    assert not hits, hits


def test_every_repository_path_the_docs_name_exists() -> None:
    missing = []
    for doc in _docs():
        for match in PATH.finditer(doc.read_text(encoding="utf-8")):
            name = match.group(1).rstrip(".")
            if "*" in name or "<" in name:
                continue
            if not (ROOT / name).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {name}")
    assert not missing, missing
