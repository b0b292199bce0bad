"""Self-contained HTML reports built from sections: figures are embedded, so one file can be mailed or archived."""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Section:
    """One titled block of a report; ``body`` is trusted HTML built with the helpers below."""

    title: str
    body: str = ""
    warnings: list[str] = field(default_factory=list)
    anchor: str | None = None
    errors: list[str] = field(default_factory=list)
    """Shown above the warnings in red: something was not produced or could not be read."""


def figure_html(fig, caption: str | None = None, dpi: int = 100) -> str:
    """Embed a matplotlib figure as a PNG data URI and close it (reports make many figures)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(caption or "")}" src="data:image/png;base64,{data}"/>{cap}</figure>'


def table_html(df: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """Render a DataFrame as an HTML table with readable numbers."""
    return df.to_html(index=False, border=0, classes="tbl", na_rep="n/a",
                      float_format=lambda x: float_format.format(x))


def text_html(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def kv_table_html(items, header: tuple[str, str] | None = None) -> str:
    """Two-column key/value table (summary and provenance blocks); values are escaped."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in (items.items() if isinstance(items, dict) else items))
    head = (f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>"
            if header else "")
    return f'<table class="tbl kv">{head}{rows}</table>'


def messages_html(messages, kind: str = "warn") -> str:
    """Warning (kind="warn") or error (kind="err") boxes, one per message."""
    cls = "err" if kind == "err" else "warn"
    return "".join(f'<div class="{cls}">{html.escape(str(m))}</div>' for m in messages)


def details_html(summary: str, body: str, open_: bool = False) -> str:
    """Collapsible block for long material (per-session detail, provenance)."""
    return (f"<details{' open' if open_ else ''}><summary>{html.escape(summary)}</summary>"
            f"{body}</details>")


def subsection_html(title: str, body: str) -> str:
    return f"<h3>{html.escape(title)}</h3>{body}"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{border-bottom:2px solid #446}h2{color:#335;margin-top:1.6em}
table.tbl{border-collapse:collapse;font-size:.9em}table.tbl td,table.tbl th{padding:2px 8px;border-bottom:1px solid #ddd}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}
.warn{background:#fff3cd;border-left:4px solid #e0a800;padding:4px 8px;margin:4px 0}
.err{background:#f8d7da;border-left:4px solid #c82333;padding:4px 8px;margin:4px 0;font-weight:600}
table.kv th{text-align:left;color:#335;font-weight:600}
h3{color:#446;margin-top:1.2em}details{margin:.5em 0}summary{cursor:pointer;color:#335}
nav{position:sticky;top:0;background:#fff;padding:4px 0;border-bottom:1px solid #eee}
nav a{margin-right:1em}
"""


def render_report(title: str, sections: list[Section], subtitle: str | None = None) -> str:
    anchors = [s.anchor or f"s{i}" for i, s in enumerate(sections)]
    nav = " ".join(f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(text_html(subtitle))
    parts.append(f"<nav>{nav}</nav>")
    for a, s in zip(anchors, sections):
        parts.append(f'<section id="{a}"><h2>{html.escape(s.title)}</h2>')
        parts.append(messages_html(s.errors, "err"))
        parts.append(messages_html(s.warnings, "warn"))
        parts.append(s.body + "</section>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: str | os.PathLike, title: str, sections: list[Section], subtitle: str | None = None) -> Path:
    """Write the report atomically (readers never see a half-written file; permissions follow the
    umask, so a lab group can read the reports of a shared output folder)."""
    from bidsapp.bids.derivatives import atomic_write_text

    return atomic_write_text(path, render_report(title, sections, subtitle))
