"""The README as a front door, and the docs it points to: size, links that resolve, nothing dated
that belongs in docs/, the sections in order. Standard library only; no model is built."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "kernels" / "BENCH.md"]
MAX_README_BYTES = 15_000

# README's sections, in the order a newcomer reads them
SECTIONS = ["# LaDa", "## Quick start", "## Paper to code", "## One round", "## Scenarios and methods",
            "## Results at a glance", "## Kernels at a glance", "## Flower, real checkpoints, reliability",
            "## Where the paper is silent"]
QUICK_START = ["pip install -r requirements.txt && python federated.py --scenario hetero",
               "pip install -r requirements.txt && python -m pytest -q tests"]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)  # fenced code blocks: no links in there
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]*)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
EXTERNAL = re.compile(r"^(https?:|mailto:)", re.I)
# a commit hash: a standalone token of 40, or of 7-12, hex digits with at least one digit and one
# letter a-f (so that "deadbeef", "1200000" and words are not flagged)
HEX_TOKEN = re.compile(r"(?<![0-9A-Za-z_])(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{7,12})(?![0-9A-Za-z_])")


def links(text: str) -> list[str]:
    """Targets of the markdown links in text, outside code."""
    text = INLINE_CODE.sub("code", FENCE.sub("", text))
    return LINK.findall(text)


def looks_like_hash(token: str) -> bool:
    return bool(re.search(r"[0-9]", token)) and bool(re.search(r"[a-fA-F]", token))


def commit_hashes(text: str) -> list[str]:
    return [t for t in HEX_TOKEN.findall(text) if looks_like_hash(t)]


def test_link_and_hash_helpers_on_known_cases():
    md = ("[a](docs/x.md#part) ![img](../r.png) [ext](https://e.org/a) [m](mailto:a@b.c) [`code`](k/B.md)\n"
          "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n")
    assert links(md) == ["docs/x.md#part", "../r.png", "https://e.org/a", "mailto:a@b.c", "k/B.md"]
    assert commit_hashes("commit 9e7ce90 and 946ad774954e7f476bd9687aafc4f34cfc270a2d") == \
        ["9e7ce90", "946ad774954e7f476bd9687aafc4f34cfc270a2d"]
    assert commit_hashes("deadbeef 1200000 8192 152064 facade decade bf16 fp32 2.6e-03 12,000 abc-1234567") == []


def test_readme_is_short():
    assert README.stat().st_size <= MAX_README_BYTES, f"README.md is {README.stat().st_size} bytes"


@pytest.mark.parametrize("doc", [README] + DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = []
    for target in links(doc.read_text(encoding="utf-8")):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if path and not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)}: links to nothing: {missing}"


def test_readme_has_no_dates_of_sessions_or_commit_hashes():
    text = README.read_text(encoding="utf-8")
    assert "UTC" not in text
    assert commit_hashes(text) == []


def test_readme_sections_in_order():
    headings = [l.strip() for l in README.read_text(encoding="utf-8").splitlines() if l.startswith("#")]
    positions = []
    for s in SECTIONS:
        assert s in headings, f"README.md lacks the heading {s!r}"
        positions.append(headings.index(s))
    assert positions == sorted(positions), f"README.md's sections are out of order: {headings}"


def test_readme_quick_start_is_the_two_lines():
    lines = [l.split("#")[0].strip() for l in README.read_text(encoding="utf-8").splitlines()]
    for cmd in QUICK_START:
        assert cmd in lines, f"README.md lacks the quick-start line {cmd!r}"


def test_study_holds_the_generated_testbed_tables():
    text = (ROOT / "docs" / "study.md").read_text(encoding="utf-8")
    begin, end = "<!-- tables:testbed:begin -->", "<!-- tables:testbed:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    between = text[text.index(begin) + len(begin):text.index(end)]
    assert "| method |" in between and "**Hypotheses**" in between
