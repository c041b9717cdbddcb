"""README.md and docs/ quote the committed results/, never a stale copy of them.

* Tables copied from results/ are generated blocks (``<!-- generated: python -m tools.docs NAME -->``):
  the committed block must equal what ``tools.docs`` makes from today's files.
* Every other number with a decimal point in a paragraph that links a results/ file must be found in
  one of the files it links (as printed or rounded; fractions also as percentages). Numbers inside
  code spans and code blocks (settings, commands) are not quotes and are not checked.
* Links resolve inside the repository, and the pages carry no development history (issue numbers,
  "this round", load averages): that goes to CHANGELOG.md.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

from tools import docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = docs.pages(ROOT)
NUMBER = re.compile(r"(?<![\w.−-])\d+\.\d+(?![\w.])")
RESULT_LINK = re.compile(r"results/[\w./-]*[\w/]")
VERSION = re.compile(r"(?:CC BY[\w-]*|Apache-|[Pp]ython|torch|DVC|anomalib)\s*[≥=]*\s*\d+(?:\.\d+)+")  # names, not quotes
README_MAX_LINES = 210


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines, with generated blocks and fenced code removed."""
    text = docs.BLOCK.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def linked_files(block: str) -> list[Path]:
    out: list[Path] = []
    for m in RESULT_LINK.findall(block):
        p = ROOT / m.rstrip("/.")
        cands = sorted(p.rglob("*")) if p.is_dir() else [p, p.with_suffix(".json"), p.with_suffix(".md")]
        out += [c for c in cands if c.is_file() and c.suffix in (".md", ".json", ".csv", ".tex")]
    return out


@lru_cache(maxsize=None)
def values(path: Path) -> tuple[float, ...]:
    text = path.read_text(errors="ignore")
    nums = [float(x) for x in re.findall(r"\d+\.\d+|\d+", text)]
    if path.suffix == ".json":
        def walk(o):
            if isinstance(o, bool):
                return
            if isinstance(o, (int, float)):
                nums.append(float(o))
            elif isinstance(o, dict):
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
        walk(json.loads(text))
    return tuple(nums)


def found(quote: str, files: list[Path]) -> bool:
    x, tol = float(quote), 0.5 * 10 ** -len(quote.split(".")[1]) + 1e-9
    return any(abs(v - x) <= tol or abs(100 * v - x) <= tol for f in files for v in values(f))


def unmatched_quotes(text: str) -> list[str]:
    bad = []
    for block in paragraphs(text):
        files = linked_files(block)
        if not files:
            continue
        prose = VERSION.sub("", re.sub(r"`[^`\n]*`", "", re.sub(r"\]\([^)]*\)", "]", block)))
        bad += [f"{q} (not in {', '.join(_rel(f) for f in files)}): {block[:80]!r}"
                for q in NUMBER.findall(prose) if not found(q, files)]
    return bad


def test_generated_blocks_are_current():
    assert not docs.stale(ROOT), f"stale generated blocks: run `python -m tools.docs` ({docs.stale(ROOT)})"
    names = {m.group(2) for p in PAGES for m in docs.BLOCK.finditer(p.read_text())}
    assert {"results-table", "spread-table", "peers-table", "config"} <= names
    assert names <= set(docs.BLOCKS)


def test_a_stale_generated_block_is_caught():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- generated: python -m tools.docs results-table -->")
    i = text.index("100.00", start)              # a number inside the generated results table
    tampered = text[:i] + "100.01" + text[i + 6:]
    assert tampered != text and docs.render(tampered) != tampered and docs.render(tampered) == docs.render(text)


def test_the_tables_follow_the_results_files(monkeypatch):
    """A changed results file changes the generated table (so a stale page fails the test above)."""
    before = docs.results_table()
    real = docs._json

    def changed(name):
        data = real(name)
        if name == "peers.json":
            for r in data["rows"]:
                r["pixel_auroc"] = 50.0
        return data

    monkeypatch.setattr(docs, "_json", changed)
    assert docs.results_table() != before and "50.00" in docs.results_table()


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_quoted_numbers_are_in_the_linked_results(page):
    bad = unmatched_quotes(page.read_text())
    assert not bad, bad


def test_a_wrong_quote_is_caught():
    ok = "bottle: AnomalyDINO's pixel AUROC is 98.95 ([results/peers.md](results/peers.md))."
    assert unmatched_quotes(ok) == []
    assert unmatched_quotes(ok.replace("98.95", "98.97"))
    assert unmatched_quotes("our exact default took 91.4 s ([results/knn_speed.md](results/knn_speed.md))")
    assert unmatched_quotes("the setting `-S x=98.97` ([results/peers.md](results/peers.md))") == []


def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


@pytest.mark.parametrize("page", [*PAGES, ROOT / "CHANGELOG.md"], ids=_rel)
def test_links_resolve_inside_the_repository(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text):
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT) or not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md":
            heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            if anchor not in heads:
                bad.append(target)
    assert not bad, bad


HISTORY = re.compile(r"\bissue #?\d+|(?<![\w/])#\d+\b|this round|this session|load average|\bmd5\b|\.\./shared|/tmp/|"
                     r"/work/", re.I)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_pages_read_as_documentation_not_history(page):
    hits = [m.group(0) for m in HISTORY.finditer(page.read_text())]
    assert not hits, f"{_rel(page)}: {hits} (dated history goes to CHANGELOG.md)"


def test_readme_stays_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/"
