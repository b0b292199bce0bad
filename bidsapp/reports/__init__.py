"""Participant and group HTML reports: self-contained files (figures embedded) built from sections.

``html`` holds the section model and writers; ``figures`` the pictures (overlays, registration
checks, volume plots); ``participant`` and ``group`` assemble ``sub-<label>.html`` and ``group.html``.
"""

from bidsapp.reports.html import Section, figure_html, render_report, table_html, text_html, write_report

__all__ = ["Section", "figure_html", "render_report", "table_html", "text_html", "write_report"]
