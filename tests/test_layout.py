"""The code base's layout rules: no package imports one that imports it back, and one home per label set
and per acquisition-parameter translation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "bidsapp" and len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (module level or inside functions)."""
    mod = _module_name(path).split(".")
    pkg = mod if path.name == "__init__.py" else mod[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
    return out


def _sources():
    return [p for d in ("bidsapp", "workflows") for p in (ROOT / d).rglob("*.py")]


def test_no_package_imports_one_that_imports_it_back():
    edges: dict[str, set[str]] = {}
    for path in _sources():
        src = _package(_module_name(path))
        for name in _imports(path):
            if name.split(".")[0] in ("bidsapp", "workflows"):
                dst = _package(name)
                if dst not in (src, "bidsapp"):
                    edges.setdefault(src, set()).add(dst)
    cycles = sorted({tuple(sorted((a, b))) for a, bs in edges.items() for b in bs if a in edges.get(b, ())})
    assert not cycles, f"packages importing each other: {cycles}"


def test_the_tissue_label_tuple_and_parameter_tables_have_one_home():
    tuple_re = re.compile(r"""\(\s*["']CSF["'],\s*["']GM["'],\s*["']WM["']""")
    table_re = re.compile(r"""["']repetition_time["']\s*:\s*["']RepetitionTime["']|"""
                          r"""["']RepetitionTime["']\s*:\s*\(?["']repetition_time["']""")
    tuples = [p.relative_to(ROOT).as_posix() for p in _sources() if tuple_re.search(p.read_text())]
    tables = [p.relative_to(ROOT).as_posix() for p in _sources() if table_re.search(p.read_text())]
    assert tuples == [], f"spell the tissue classes as bidsapp.labels.TISSUE: {tuples}"
    assert tables == ["bidsapp/bids/acquisition.py"], tables
