"""README.md's layout table matches the tree: every module of the packages (flm/, cluster/, service/, api/) is listed
by its path, every folder of modules below them (flm/iq/, api/console/, ...) by its folder, and nothing listed is
gone. A module added, renamed or split fails here until the table says what it holds."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flm", "cluster", "service", "api")


def layout_paths(readme: str) -> set[str]:
    """The backquoted paths in the first column of the table under '## Layout'."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {path for row in rows for path in re.findall(r"`([^`]+)`", row.split("|")[1])}


def package_paths() -> set[str]:
    """Each package's modules (`api/app.py`; `__init__.py` aside) and its folders holding modules (`flm/iq/`)."""
    found = set()
    for pkg in PACKAGES:
        found |= {f"{pkg}/{p.name}" for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"}
        found |= {f"{pkg}/{d.name}/" for d in (ROOT / pkg).iterdir() if d.is_dir() and any(d.rglob("*.py"))}
    return found


def test_layout_paths_reads_the_first_column_only():
    readme = "# x\n\n## Layout\n\n| path | what |\n|---|---|\n| `a/b.py`, `a/c/` | uses `a/d.py` |\n\n## Next\n"
    assert layout_paths(readme) == {"a/b.py", "a/c/"}


def test_the_layout_table_lists_every_module():
    listed = layout_paths((ROOT / "README.md").read_text())
    missing = sorted(package_paths() - listed)
    assert not missing, f"README.md's layout table lacks {', '.join(missing)}"
    gone = sorted(p for p in listed if p.split("/")[0] in PACKAGES and not (ROOT / p).exists())
    assert not gone, f"README.md's layout table lists {', '.join(gone)}, which no longer exist"
