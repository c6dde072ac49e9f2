"""``aios-fast bench compare A.json B.json``: two reports' figures side by side.

Figures are matched by id (``group.name``, stable across machines); a figure only one report
has is listed with "—" on the other side. The ratios are the comparable part: each was
measured against its peer on its own machine in the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import format_value, load_report

__all__ = ["compare_reports", "print_comparison"]


def _label(report: dict[str, Any], path: str) -> str:
    m = report["machine"]
    gpu = m["gpus"][0]["name"] if m["gpus"] else "no GPU"
    quick = " (quick)" if report["quick"] else ""
    return f"{Path(path).name}: {report['tier']['name']}, {m['cores']} cores, {gpu}{quick}"


def compare_reports(a_path: str | Path, b_path: str | Path) -> dict[str, Any]:
    """Load and validate both reports and pair their figures by id. Returns
    ``{"a": label, "b": label, "rows": [{id, title, unit, a, b, a_status, b_status, change}]}``
    where ``a``/``b`` are the values (None where absent or not measured) and ``change`` is b / a
    for speed-ups, b − a (percentage points) for overheads, else None."""
    a, b = load_report(a_path), load_report(b_path)
    fa = {f["id"]: f for f in a["figures"]}
    fb = {f["id"]: f for f in b["figures"]}
    rows = []
    for fid in list(fa) + [i for i in fb if i not in fa]:
        x, y = fa.get(fid), fb.get(fid)
        ref = x or y
        va = x["value"] if x else None
        vb = y["value"] if y else None
        change = None
        if va is not None and vb is not None:
            if ref["metric"] == "overhead":
                change = vb - va
            elif va:
                change = vb / va
        rows.append({"id": fid, "title": ref["title"], "metric": ref["metric"], "unit": ref["unit"],
                     "a": va, "b": vb, "a_text": format_value(x) if x else "—",
                     "b_text": format_value(y) if y else "—",
                     "a_status": x["status"] if x else "absent", "b_status": y["status"] if y else "absent",
                     "change": change})
    return {"a": _label(a, str(a_path)), "b": _label(b, str(b_path)), "rows": rows}


def print_comparison(cmp: dict[str, Any], console) -> None:
    """Print :func:`compare_reports`' result as a rich table."""
    from rich.table import Table

    t = Table(title="aios-fast bench compare", caption=f"A = {cmp['a']}\nB = {cmp['b']}")
    for col in ("figure", "A", "B", "B vs A"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for r in cmp["rows"]:
        if r["change"] is None:
            ch = ""
        elif r["metric"] == "overhead":
            ch = f"{r['change']:+.1f} pt"
        else:
            ch = f"{r['change']:.2f}×"
        t.add_row(r["id"], f"{r['a_text']} ({r['a_status']})", f"{r['b_text']} ({r['b_status']})", ch)
    console.print(t)
