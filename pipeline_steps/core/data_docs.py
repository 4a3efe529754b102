"""Great Expectations Data Docs that render with no network (an air-gapped hospital): what the pages
load from CDNs comes from files shipped here, and the tables GX draws with JavaScript are drawn into
the HTML itself.

GX's pages take Bootstrap, bootstrap-table, jQuery, Font Awesome and Vega from CDNs and their logo
from GX's web assets (with the data context id in its query: a tracker). Offline, the index page is
empty (its tables are built by bootstrap-table) and the pass/fail marks vanish (a web font). So each
page, after GX writes it, loses every script and remote asset and gets Bootstrap 4.3.1's CSS (the
version GX asks for, vendored with its MIT licence) plus `radflow-offline.css` (the few icons as SVG
shapes, the tabs and collapsed cards shown without JavaScript). Vega charts, which some expectation
types draw, do not render; radflow's suites use none.
"""

from __future__ import annotations

import ast
import html
import os
import re
from pathlib import Path
from typing import Any

from pipeline_steps.core.files import copy_atomic, write_text_atomic

STATIC = Path(__file__).with_name("data_docs_static")
BOOTSTRAP_CSS = "bootstrap-4.3.1.min.css"
OFFLINE_CSS = "radflow-offline.css"
SITE_ASSETS = "static/radflow"  # under the Data Docs site, beside GX's own static/

STATIC_TABLE_CLASS = "radflow-static-table table table-hover"
GX_WEB_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>\s*", re.S | re.I)
_REMOTE_LINK = re.compile(r"<link\b[^>]*\bhref=\"https?://[^\"]*\"[^>]*>\s*", re.I)
_GX_IMAGE = re.compile(re.escape(GX_WEB_ASSETS) + r"([\w.-]+?)(?:\?[^\"')\s]*)?(?=[\"')\s])")
# One bootstrap-table call, as GX's bootstrap_table.j2 writes it (Python reprs of columns and rows).
_TABLE_CALL = re.compile(
    r"\$\('#(?P<id>[\w-]+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*"
    r"columns: (?P<columns>\[.*?\]),\s*data: (?P<data>\[.*?\]),\s*toolbar: '[^']*'\s*\},\s*"
    r"(?P<options>\{.*?\})\s*\)\s*\);",
    re.S,
)


def _with_class(tag: str, names: str) -> str:
    """An opening tag (without its `>`) with `names` added to its class attribute."""
    if 'class="' in tag:
        return tag.replace('class="', f'class="{names} ', 1)
    return f'{tag} class="{names}"'


def _empty_table(table_id: str) -> re.Pattern[str]:
    return re.compile(rf"(<table\b[^>]*\bid=\"{re.escape(table_id)}\"[^>]*)>\s*</table>", re.S)


def static_table(
    columns: list[dict[str, Any]], rows: list[dict[str, Any]], options: dict[str, Any]
) -> str:
    """The <thead>/<tbody> bootstrap-table would build: GX's cell HTML as it is, rows sorted as GX
    asks, each cell a link to the row's page where GX makes rows clickable."""
    field = options.get("sortName")
    if field:
        column = next((c for c in columns if c.get("field") == field), {})
        key = column.get("sortName", field)
        present = [row for row in rows if row.get(key) is not None]
        present.sort(key=lambda row: row[key], reverse=options.get("sortOrder") == "desc")
        rows = present + [row for row in rows if row.get(key) is None]
    head = "".join(f"<th>{html.escape(str(c.get('title', c['field'])))}</th>" for c in columns)
    body = []
    for row in rows:
        link = row.get("_table_row_link_path")
        cells = []
        for column in columns:
            cell = str(row.get(column["field"], ""))
            if link and "<a " not in cell:
                cell = f'<a class="radflow-row-link" href="{html.escape(link)}">{cell}</a>'
            align = ' class="text-center"' if column.get("align") == "center" else ""
            cells.append(f"<td{align}>{cell}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"


def offline_page(page: str, site_prefix: str) -> str:
    """One Data Docs page made self-contained; `site_prefix` leads from the page to the site root
    ("" for the index, "../../" for a page two folders down)."""
    for call in _TABLE_CALL.finditer(page):
        table = static_table(
            ast.literal_eval(call["columns"]),
            ast.literal_eval(call["data"]),
            ast.literal_eval(call["options"]),
        )
        empty = _empty_table(call["id"]).search(page)
        if empty:
            filled = f"{_with_class(empty[1], STATIC_TABLE_CLASS)}>{table}</table>"
            page = page[: empty.start()] + filled + page[empty.end() :]
    page = _SCRIPT.sub("", page)
    page = _REMOTE_LINK.sub("", page)
    # GX's logo from its own static/images; the dark-mode logo is not shipped, so use the same one.
    page = _GX_IMAGE.sub(
        lambda m: (
            f"{site_prefix}static/images/"
            + ("logo-long.png" if m[1] == "full_logo_dark.png" else m[1])
        ),
        page,
    )
    assets = f"{site_prefix}{SITE_ASSETS}/"
    links = (
        f'<link rel="stylesheet" href="{assets}{BOOTSTRAP_CSS}">\n'
        f'<link rel="stylesheet" href="{assets}{OFFLINE_CSS}">\n'
    )
    if assets + OFFLINE_CSS not in page:
        page = re.sub(r"(<meta charset=\"UTF-8\">\s*)", lambda m: m[1] + links, page, count=1)
    return page


def make_offline(site: Path) -> list[Path]:
    """Copy the local assets into the Data Docs site at `site` and rewrite every page that still
    refers to the network; the pages rewritten."""
    target = site / SITE_ASSETS
    target.mkdir(parents=True, exist_ok=True)
    for asset in sorted(STATIC.iterdir()):
        if not (target / asset.name).exists() or (
            (target / asset.name).read_bytes() != asset.read_bytes()
        ):
            copy_atomic(asset, target / asset.name)
    changed = []
    for path in sorted(site.rglob("*.html")):
        page = path.read_text(encoding="utf-8")
        prefix = os.path.relpath(site, path.parent).replace(os.sep, "/") + "/"
        new = offline_page(page, "" if prefix == "./" else prefix)
        if new != page:
            write_text_atomic(path, new)
            changed.append(path)
    return changed


def remote_references(page: str) -> list[str]:
    """The http(s) URLs a page would load (stylesheets, scripts, images, CSS urls), not its links."""
    loads = re.findall(
        r"<(?:link|script|img)\b[^>]*\b(?:href|src)=\"(https?://[^\"]+)\"", page, re.I
    )
    return loads + re.findall(r"url\(['\"]?(https?://[^'\")]+)", page)
