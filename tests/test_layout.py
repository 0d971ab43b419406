"""The house stays readable: no import circle in llmft/ or scripts/, no module of llmft over ~400 lines, and every
relative link of the README and the docs pages leads to a file (and heading) that exists, with no page unreachable."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, wherever in the file (functions included), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from llmft.rl import setup`
    return found


def graph(base: Path, files: list[Path]) -> dict[str, set[str]]:
    names = {module_name(p, base): p for p in files}
    return {n: {m for m in imports(p) if m in names and m != n} for n, p in names.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_in_the_package_or_the_scripts():
    package = graph(ROOT, sorted((ROOT / "llmft").rglob("*.py")))
    assert package["llmft.stages.ppo"] >= {"llmft.rl.setup", "llmft.run.loop"}  # the graph is read
    assert circles(package) == []
    scripts = graph(ROOT / "scripts", sorted((ROOT / "scripts").glob("*.py")))
    assert "bench_common" in scripts["bench_grpo"]
    assert circles(scripts) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "llmft").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_link_of_the_readme_and_the_docs_resolves_and_no_page_is_unreachable():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    reached, broken = {ROOT / "README.md"}, []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
            reached.add(file)
    assert broken == []
    assert [p.name for p in pages if p not in reached] == []
