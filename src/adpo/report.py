"""One self-contained HTML page per evaluation or dataset check, to look at pair by pair.

The page holds everything it shows: images as base64 JPEG thumbnails, plots as base64 PNG, a small inline script
that sorts the table (click a column header) and filters it by group (a link can open a view: ``#group=VALUE``,
``#sort=N`` or ``#sort=-N`` for column N, descending). It loads nothing from anywhere, so it opens
from disk in any browser with no server and no network. All text from the data (prompts, responses, column
values, file names) is HTML-escaped: a row holding markup or script shows as text.

Rows are ordered worst first (an evaluation: smallest policy margin log π(y|x_w) − log π(y|x_l); a check: refused
rows, then pairs with identical sides, then duplicates).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

THUMBNAIL = 160  # longest edge of a thumbnail, pixels


@dataclass
class Column:
    key: str
    label: str
    kind: str = "text"  # text | num | images | tag (short text kept on one line)


def thumbnail(value: Any, size: int = THUMBNAIL) -> str | None:
    """A data: URI of a JPEG thumbnail of one image value, or None when it cannot be read."""
    from .images import ImageLoadError, load_image

    try:
        image = load_image(value)
    except (ImageLoadError, OSError, ValueError):
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_uri(path_or_bytes: str | Path | bytes | None) -> str | None:
    if path_or_bytes is None:
        return None
    if isinstance(path_or_bytes, (str, Path)):
        path = Path(path_or_bytes)
        if not path.exists():
            return None
        path_or_bytes = path.read_bytes()
    return "data:image/png;base64," + base64.b64encode(path_or_bytes).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "" if value is None else _esc(value)
    return f"{value:.4f}" if isinstance(value, float) else _esc(value)


def _cell(column: Column, value: Any) -> str:
    if column.kind == "num":
        sort = value if isinstance(value, (int, float)) and math.isfinite(value) else ""
        return f'<td class="num" data-v="{_esc(sort)}">{_number(value)}</td>'
    if column.kind == "images":
        parts = [f'<img src="{uri}" alt="image {k}">' if uri else
                 '<span class="bad">unreadable image</span>' for k, uri in enumerate(value or [])]
        return f'<td class="imgs">{"".join(parts) or "<span class=muted>none</span>"}</td>'
    if column.kind == "tag":
        return f'<td class="tag">{_esc(value)}</td>'
    return f'<td data-v="{_esc(value)}"><div class="txt">{_esc(value)}</div></td>'


_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top}
th{background:#f4f4f4;cursor:pointer;position:sticky;top:0;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.imgs img{max-width:160px;max-height:160px;margin:2px;display:inline-block;border:1px solid #ccc}
td.tag{white-space:nowrap}div.txt{max-width:22em;max-height:12em;overflow:auto;white-space:pre-wrap;word-break:break-word}
.bad{color:#b00}.muted{color:#888}.summary td:first-child{font-weight:600}
img.plot{max-width:100%;border:1px solid #eee}#count{margin-left:1em;color:#555}
"""

# Sorting and filtering, nothing else; it touches only this page's own table.
_SCRIPT = """
(function(){
  var table=document.getElementById('pairs');
  if(!table){return;}
  var body=table.tBodies[0];
  var heads=table.tHead.rows[0].cells;
  function value(row,i){var c=row.cells[i];return c.hasAttribute('data-v')?c.getAttribute('data-v'):c.textContent;}
  function sortBy(i){
    var h=heads[i],asc=!h.classList.contains('sorted-asc'),num=h.getAttribute('data-kind')==='num';
    for(var k=0;k<heads.length;k++){heads[k].classList.remove('sorted-asc','sorted-desc');}
    h.classList.add(asc?'sorted-asc':'sorted-desc');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=value(a,i),y=value(b,i);
      if(num){var fx=x===''?Infinity:parseFloat(x),fy=y===''?Infinity:parseFloat(y);
        return asc?fx-fy:fy-fx;}
      return asc?x.localeCompare(y):y.localeCompare(x);
    });
    rows.forEach(function(r){body.appendChild(r);});
  }
  for(var i=0;i<heads.length;i++){(function(i){heads[i].addEventListener('click',function(){sortBy(i);});})(i);}
  var filter=document.getElementById('group');
  var count=document.getElementById('count');
  function apply(){
    var g=filter?filter.value:'',shown=0;
    Array.prototype.forEach.call(body.rows,function(r){
      var ok=g===''||r.getAttribute('data-group')===g;r.style.display=ok?'':'none';if(ok){shown++;}
    });
    count.textContent=shown+' of '+body.rows.length+' rows shown';
  }
  if(filter){filter.addEventListener('change',apply);}
  // A link can open a view: #group=VALUE filters, #sort=N sorts by column N (#sort=-N: descending).
  var hash=new URLSearchParams(location.hash.slice(1));
  if(filter&&hash.has('group')){filter.value=hash.get('group');}
  if(hash.has('sort')){var n=parseInt(hash.get('sort'),10);
    if(Math.abs(n)<heads.length){sortBy(Math.abs(n));if(n<0||hash.get('sort')==='-0'){sortBy(Math.abs(n));}}}
  apply();
  window.addEventListener('load',function(){
    // Say on the page if any thumbnail failed to decode (a broken image would otherwise look like a blank).
    var images=document.querySelectorAll('img'),broken=0;
    Array.prototype.forEach.call(images,function(i){if(!i.complete||i.naturalWidth===0){broken++;}});
    document.body.setAttribute('data-images',(images.length-broken)+'/'+images.length);
    if(broken){var p=document.createElement('p');p.className='bad';
      p.textContent=broken+' of '+images.length+' images could not be decoded';
      document.body.insertBefore(p,document.body.firstChild);}
  });
})();
"""


def render(
    title: str,
    summary: dict[str, Any],
    columns: Sequence[Column],
    rows: Sequence[dict[str, Any]],
    *,
    plots: Sequence[tuple[str, str | None]] = (),
    notes: Sequence[str] = (),
    group_label: str = "group",
) -> str:
    """The page: a summary table, the plots (``(caption, data URI)``), notes, and the sortable pairs table whose
    rows carry their group in the ``"_group"`` key (filterable when any row has one)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_esc(title)}</title>", f"<style>{_STYLE}</style></head><body>", f"<h1>{_esc(title)}</h1>"]
    out.append('<table class="summary">' + "".join(
        f"<tr><td>{_esc(k)}</td><td>{_summary_value(v)}</td></tr>" for k, v in summary.items()) + "</table>")
    for note in notes:
        out.append(f"<p>{_esc(note)}</p>")
    for caption, uri in plots:
        if uri:
            out.append(f"<h2>{_esc(caption)}</h2><img class=\"plot\" src=\"{uri}\" alt=\"{_esc(caption)}\">")
    out.append("<h2>Pairs</h2><p>")
    groups = sorted({str(r["_group"]) for r in rows if r.get("_group") is not None})
    if groups:
        options = "".join(f'<option value="{_esc(g)}">{_esc(g)}</option>' for g in groups)
        out.append(f'<label>{_esc(group_label)}: <select id="group"><option value="">all</option>{options}'
                   "</select></label>")
    out.append('<span id="count"></span></p>')
    head = "".join(f'<th data-kind="{c.kind}">{_esc(c.label)}</th>' for c in columns)
    out.append(f'<table id="pairs"><thead><tr>{head}</tr></thead><tbody>')
    for row in rows:
        group = row.get("_group")
        attr = f' data-group="{_esc(group)}"' if group is not None else ""
        out.append(f"<tr{attr}>" + "".join(_cell(c, row.get(c.key)) for c in columns) + "</tr>")
    out.append(f"</tbody></table><script>{_SCRIPT}</script></body></html>")
    return "\n".join(out)


def _summary_value(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return "<br>".join(f"{_esc(k)}: {_summary_value(v)}" for k, v in value.items())
    return _esc(value)


def _images(row: dict[str, Any], field: str) -> list[str | None]:
    from .data import row_images

    try:
        values = row_images(row, field, None)
    except ValueError:
        return [None]
    return [thumbnail(v) for v in values]


def _write(page: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ evaluation
def eval_report(
    report: dict[str, Any],
    records: dict[str, list[dict[str, Any]]],
    dataset: Any,
    path: str | Path,
    *,
    plot: str | Path | None = None,
    group_by: Sequence[str] = (),
    max_rows: int = 1000,
) -> Path:
    """The ``adpo-eval --html`` page. ``records[label]`` holds one record per scored row, ``record["row"]`` the
    row's id in ``dataset`` (its ``_adpo_row`` column, or its position); rows skipped for one model show blanks in
    its columns. Rows are shown worst first by the first model's policy margin."""
    from .data import ROW_ID

    labels = list(records)
    first = records[labels[0]]
    ids = dataset[ROW_ID] if ROW_ID in dataset.column_names else list(range(len(dataset)))
    position = {row_id: k for k, row_id in enumerate(ids)}
    by_row = {label: {r["row"]: r for r in records[label]} for label in labels}
    order = sorted(first, key=lambda r: (r["logp_margin"], r["row"]))
    shown = order[:max_rows]
    columns = [Column("row", "row", "num")]
    if group_by:
        columns.append(Column("_group", " / ".join(group_by)))
    columns += [Column("chosen_images", "chosen images", "images"), Column("rejected_images", "rejected images",
                "images"), Column("response", "response"), Column("chosen", "chosen prompt"),
                Column("rejected", "rejected prompt")]
    for label in labels:
        prefix = f"{label}: " if len(labels) > 1 else ""
        columns += [Column(f"{label}|logp_margin", f"{prefix}margin log π(y|x_w) − log π(y|x_l)", "num"),
                    Column(f"{label}|logp_chosen", f"{prefix}log π(y|x_w)", "num"),
                    Column(f"{label}|logp_rejected", f"{prefix}log π(y|x_l)", "num")]
        if records[label] and "ref_logp_chosen" in records[label][0]:
            columns += [Column(f"{label}|ref_logp_chosen", f"{prefix}log π_ref(y|x_w)", "num"),
                        Column(f"{label}|ref_logp_rejected", f"{prefix}log π_ref(y|x_l)", "num"),
                        Column(f"{label}|reward_margin", f"{prefix}reward margin", "num")]
    rows = []
    for record in shown:
        row = dataset[position[record["row"]]]
        out: dict[str, Any] = {"row": record["row"], "response": row.get("response"), "chosen": row.get("chosen"),
                               "rejected": row.get("rejected"), "chosen_images": _images(row, "chosen_images"),
                               "rejected_images": _images(row, "rejected_images")}
        if group_by:
            out["_group"] = " / ".join(str(row.get(g)) for g in group_by)
        for label in labels:
            out |= {f"{label}|{key}": value for key, value in by_row[label].get(record["row"], {}).items()}
        rows.append(out)
    summary: dict[str, Any] = {"dataset": report.get("dataset"), "split": report.get("split"),
                               "beta": report.get("beta")}
    for label, s in report["models"].items():
        summary[label] = {k: v for k, v in s.items() if k != "groups"}
        for column, values in s.get("groups", {}).items():
            summary[f"{label} by {column}"] = {g: m.get("prompt_accuracy") for g, m in values.items()}
    notes = [f"Rows sorted worst first by {labels[0]}'s margin; click a header to sort."]
    if len(order) > len(shown):
        notes.append(f"Showing the {len(shown)} worst of {len(order)} rows (--html_max_rows).")
    page = render(f"ADPO evaluation: {labels[0]}", summary, columns, rows,
                  plots=[("Evaluation", png_uri(plot))], notes=notes, group_label=" / ".join(group_by) or "group")
    return _write(page, path)


# ------------------------------------------------------------------------------------------------ dataset check
def check_report(result: Any, name: str, path: str | Path, *, max_rows: int = 1000) -> Path:
    """The ``adpo-data check --html`` page for a :class:`adpo.pairs.check.CheckResult`."""
    identical, duplicate = set(result.identical), {r for g in result.duplicates for r in g[1:]}

    def status(record: dict[str, Any]) -> str:
        if record["problem"]:
            return "refused"
        if record["row"] in identical:
            return "identical sides"
        return "duplicate" if record["row"] in duplicate else "ok"

    rank = {"refused": 0, "identical sides": 1, "duplicate": 2, "ok": 3}
    order = sorted(result.rows, key=lambda r: (rank[status(r)], r["row"]))
    shown = order[:max_rows]
    columns = [Column("row", "row", "num"), Column("_group", "status", "tag"), Column("why", "problem"),
               Column("chosen_images", "chosen images", "images"),
               Column("rejected_images", "rejected images", "images"), Column("response", "response"),
               Column("chosen", "chosen prompt"), Column("rejected", "rejected prompt")]
    if any("tokens_chosen" in r for r in result.rows):
        columns += [Column("tokens_chosen", "tokens (chosen side)", "num"),
                    Column("tokens_rejected", "tokens (rejected side)", "num"),
                    Column("tokens_response", "response tokens", "num")]
    rows = []
    for record in shown:
        row = result.source.row(record["position"]) if record["position"] is not None else {}
        why = f"{record['field']}: {record['problem']}" if record["problem"] else ""
        rows.append({**record, "_group": status(record), "why": why, "response": row.get("response"),
                     "chosen": row.get("chosen"), "rejected": row.get("rejected"),
                     "chosen_images": _images(_absolute(row, result.source), "chosen_images"),
                     "rejected_images": _images(_absolute(row, result.source), "rejected_images")})
    notes = ["Rows the trainer would refuse first, then pairs with identical sides, then duplicates."]
    if len(order) > len(shown):
        notes.append(f"Showing {len(shown)} of {len(order)} rows (--html_max_rows).")
    page = render(f"ADPO dataset check: {name}", result.summary(), columns, rows,
                  plots=[("Tokens per side", png_uri(_length_histogram(result)))], notes=notes,
                  group_label="status")
    return _write(page, path)


def _absolute(row: dict[str, Any], source: Any) -> dict[str, Any]:
    """Image paths relative to the source file resolved (a check of a dataset read by the trainer has none)."""
    import os

    root = getattr(source, "image_root", None)
    if root is None:
        return row
    out = dict(row)
    for field in ("chosen_images", "rejected_images"):
        values = row.get(field)
        if isinstance(values, list):
            out[field] = [os.path.join(root, v) if isinstance(v, str) and not os.path.isabs(v) else v
                          for v in values]
    return out


def _length_histogram(result: Any) -> bytes | None:
    from .plots import _pyplot

    sides = {side: result.lengths(side) for side in ("chosen", "rejected")}
    if not any(sides.values()):
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    for side, values in sides.items():
        if values:
            ax.hist(values, bins=min(40, max(5, len(set(values)))), alpha=0.6, label=side)
    ax.set_xlabel("tokens (prompt + image tokens + response)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
