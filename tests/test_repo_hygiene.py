"""The repository points at nothing outside itself, and its documents point at files that exist.

* No outside design document and no path outside the checkout, anywhere.
* No issue numbers in code, nor in the documents a reader is sent to (README.md, bench/README.md, docs/*.md): they
  say the thing itself. Every tracked Markdown file is one of those today, so none is exempt; a document that must
  keep an outside numbering (a copied changelog, say) would be listed in :data:`ISSUE_EXEMPT` with its reason.
* Every relative Markdown link in those documents names a file of the repository, and a ``#fragment`` names a
  heading of the target file (GitHub's anchors: lower case, punctuation dropped, spaces to ``-``, ``-1`` ... for
  repeated headings). Links with a scheme (``https:``, ``mailto:``) are not followed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|/work/shared", re.IGNORECASE)
ISSUE = re.compile(r"[Ii]ssues? ?[-#]?[0-9]+|\(#[0-9]+\)")
#: Files another change is editing right now; they still hold one hit each (to clear, then drop from here).
PENDING: set[str] = set()
#: The documents readers are sent to: their links must resolve and they cite no issue numbers.
DOCUMENTS = ("README.md", "bench/README.md", "docs/*.md")
#: Documents allowed to cite issue numbers, with the reason (none today).
ISSUE_EXEMPT: dict[str, str] = {}

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def tracked(*patterns: str) -> list[Path]:
    done = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [Path(line) for line in done.stdout.splitlines() if (ROOT / line).is_file()]


def documents() -> list[Path]:
    """The documents of :data:`DOCUMENTS` as they are on disk (a new document counts before it is committed)."""
    return sorted({path.relative_to(ROOT) for pattern in DOCUMENTS for path in ROOT.glob(pattern) if path.is_file()})


def hits(pattern: re.Pattern, files: list[Path], *, skip: frozenset[str] = frozenset()) -> list[str]:
    found = []
    for path in files:
        if path.as_posix() in PENDING | skip or path.as_posix() == "tests/test_repo_hygiene.py":
            continue
        for number, line in enumerate((ROOT / path).read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path}:{number}: {line.strip()}")
    return found


def without_fences(text: str) -> str:
    """Markdown text with fenced code blocks blanked (a ``# comment`` line there is no heading)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def without_code(text: str) -> str:
    """Markdown text with fenced blocks and code spans blanked (brackets there are no links)."""
    return CODE_SPAN.sub("", without_fences(text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without code ticks, lower case, punctuation dropped, ``-`` spaces.

    >>> github_anchor("On a Ray cluster (`--executor ray`)")
    'on-a-ray-cluster---executor-ray'
    >>> github_anchor("Versions of a bank: teach, history, rollback")
    'versions-of-a-bank-teach-history-rollback'
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(without_fences(path.read_text(encoding="utf-8"))):
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(path: Path, root: Path = ROOT) -> list[str]:
    """The link targets of a Markdown file that point into the repository (no scheme), in order."""
    text = without_code((root / path).read_text(encoding="utf-8"))
    targets = [m.group(1) for m in INLINE_LINK.finditer(text)] + [m.group(1) for m in REFERENCE_LINK.finditer(text)]
    return [target for target in targets if not SCHEME.match(target)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link of ``path`` (relative to ``root``) whose file or heading does not exist."""
    broken = []
    for target in relative_links(path, root):
        file_part, _, fragment = target.partition("#")
        if file_part.startswith("/"):
            broken.append(f"{path}: {target} (absolute path: link relative to the document)")
            continue
        resolved = (root / path).parent / PurePosixPath(file_part) if file_part else root / path
        if not resolved.resolve().is_relative_to(root.resolve()):
            broken.append(f"{path}: {target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{path}: {target} (no such file in the repository)")
        elif fragment and resolved.is_file() and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{path}: {target} (no heading #{fragment} in {resolved.relative_to(root)})")
    return broken


def test_nothing_points_outside_the_repository():
    assert hits(OUTSIDE, tracked("*.py", "*.md", "*.toml", "*.txt", "*.sh", "*.yaml")) == []


def test_no_issue_numbers_in_code():
    assert hits(ISSUE, tracked("*.py")) == []


def test_no_issue_numbers_in_the_documents():
    found = documents()
    assert {"README.md", "bench/README.md", "docs/architecture.md"} <= {p.as_posix() for p in found}
    assert hits(ISSUE, found, skip=frozenset(ISSUE_EXEMPT)) == []


def test_every_relative_link_in_the_documents_points_at_a_file_of_the_repository():
    found = documents()
    assert sum(len(relative_links(path)) for path in found) >= 10  # the extraction finds the links
    broken = [line for path in found for line in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_the_link_check_finds_what_is_broken(tmp_path):
    """The checker itself: a missing file, a missing heading and an escape from the repository are reported."""
    (tmp_path / "repo" / "docs").mkdir(parents=True)
    (tmp_path / "elsewhere.md").write_text("# Elsewhere\n", encoding="utf-8")
    (tmp_path / "repo" / "docs" / "b.md").write_text("# Title\n\n## Part: one (`x`)\n\n## Part: one (`x`)\n")
    (tmp_path / "repo" / "a.md").write_text(
        "[ok](docs/b.md) [ok](docs/b.md#part-one-x) [ok](docs/b.md#part-one-x-1) [ok](#top) [web](https://x.y/z)\n"
        "[gone](docs/c.md) [no heading](docs/b.md#part-two) [out](../elsewhere.md) [fenced](#not-a-heading)\n"
        "```\n[in a fence](nowhere.md)\n# not a heading\n```\n`[in a span](nowhere.md)`\n\n# Top\n\n"
        "[ref]: docs/b.md#title\n",
        encoding="utf-8",
    )
    assert relative_links(Path("a.md"), tmp_path / "repo")[-1] == "docs/b.md#title"
    assert broken_links(Path("a.md"), tmp_path / "repo") == [
        "a.md: docs/c.md (no such file in the repository)",
        "a.md: docs/b.md#part-two (no heading #part-two in docs/b.md)",
        "a.md: ../elsewhere.md (outside the repository)",
        "a.md: #not-a-heading (no heading #not-a-heading in a.md)",
    ]


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` runs the README's "Run the tests" command verbatim, so a missing install step fails CI."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Run the tests**", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.DOTALL)
    assert command is not None, "the README's test section has no bash block"
    (line,) = command.group(1).splitlines()
    assert "-m pytest -n 2" in line, "the README runs the suite in two xdist workers"
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert line in ci_lines, f".ci/run does not run the README's test command {line!r}"
