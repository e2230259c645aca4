"""A small self-contained HTML report: a results table and sample grids."""

from __future__ import annotations

import html
import os
from pathlib import Path

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d232a;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#5b6670;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.35rem .8rem;border-bottom:1px solid #e1e4e8;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f6f8fa}
.grids{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:1.5rem;align-items:start}
figure{margin:0} figure.wide{grid-column:1/-1} figcaption{color:#5b6670;font-size:.9rem}
img{image-rendering:pixelated;border:1px solid #e1e4e8;max-width:100%;height:auto} .note{color:#5b6670;font-size:.9rem}
img.plot{image-rendering:auto}
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return html.escape(str(v))


def write_report(
    path: str | os.PathLike,
    title: str,
    subtitle: str,
    rows: list[dict],
    columns: list[tuple[str, str]],
    figures: list[tuple[str, str]],
    notes: list[str] = (),
    links: list[tuple[str, str]] = (),
) -> Path:
    """Write an HTML page (atomically).

    Args:
        path: output ``.html`` file; images are referenced relative to its folder.
        title, subtitle: page heading.
        rows: table rows (dicts); ``columns`` picks ``(key, header)`` pairs from them.
        figures: ``(relative image path, caption)`` pairs, laid out two per row (side by side), or
            ``(path, caption, "wide")`` for a figure that takes a whole row; ``"plot"`` / ``"wide plot"``
            mark charts (smooth scaling instead of the pixel grids' nearest-neighbour).
        notes: paragraphs of small print under the table.
        links: ``(relative href, text)`` pairs listed under the notes (e.g. sub-reports).
    """
    path = Path(path)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k, ''))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    figs = ""
    for src, cap, *kind in figures:
        kind = kind[0].split() if kind else []
        fig_class = ' class="wide"' if "wide" in kind else ""
        img_class = ' class="plot"' if "plot" in kind else ""
        figs += (
            f'<figure{fig_class}><img{img_class} src="{html.escape(src)}" alt="{html.escape(cap)}">'
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    notes_html += "".join(f'<p><a href="{html.escape(href)}">{html.escape(text)}</a></p>' for href, text in links)
    page = (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><h1>{html.escape(title)}</h1><p class=sub>{html.escape(subtitle)}</p>"
        f"<table><tr>{head}</tr>{body}</table>{notes_html}<div class=grids>{figs}</div></html>\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path
