"""The bench report: ``report.json`` (schema in ``report.schema.json``, next to this module),
``report.md`` and one PNG chart per group, all written atomically.

A report is plain JSON so that reports from Leaf, Hub and Super machines can be compared
(:mod:`aios_fast.bench.compare`) and rendered into BENCHMARKS.md (:func:`update_markdown_section`,
``aios-fast bench render REPORT.json --into BENCHMARKS.md``): the same tables as report.md,
headed by the command, the report, the machine, the tier and the versions that produced them.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_bytes, save_figure
from ..errors import InputError

__all__ = ["SCHEMA_ID", "schema", "validate_report", "load_report", "write_report", "render_markdown",
           "draw_chart", "update_markdown_section", "markers", "format_value"]

SCHEMA_ID = "aios-fast-bench/1"
_MARKER_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every report.json follows."""
    return json.loads(resources.files(__package__).joinpath("report.schema.json").read_text(encoding="utf-8"))


def validate_report(report: dict[str, Any], source: str = "report") -> None:
    """Raise :class:`InputError` naming the first field that breaks the schema (needs ``jsonschema``)."""
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - jsonschema ships with the test/bench extras
        raise InputError("validating a bench report needs jsonschema: pip install jsonschema") from exc
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise InputError(f"{source}: field {where}: {e.message} ({len(errors)} schema error(s) in all)")


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report.json; errors name the file and the field."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such report (aios-fast bench --out DIR writes DIR/report.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a JSON report: {exc}") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA_ID:
        got = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise InputError(f"{path}: schema {got!r}, expected {SCHEMA_ID!r} (a report of aios-fast bench)")
    validate_report(report, str(path))
    return report


def format_value(fig: dict[str, Any]) -> str:
    """A figure's value as quoted: ``12.3×``, ``+2.1 %``, ``0.45 s``, or its status."""
    v = fig.get("value")
    if v is None:
        return fig["status"]
    if fig["metric"] == "speedup":
        return f"{v:.2f}×"
    if fig["metric"] == "overhead":
        return f"{v:+.1f} %"
    return f"{v:.3g} s"


def _spread(fig: dict[str, Any]) -> str:
    s = fig.get("spread")
    if not s:
        return ""
    if fig["metric"] == "overhead":
        return f"{s[0]:+.1f} … {s[1]:+.1f}"
    return f"{s[0]:.2f} … {s[1]:.2f}"


def _secs(side: dict[str, Any] | None) -> str:
    if not side:
        return "—"
    m = side["median"]
    t = f"{m * 1e6:.1f} µs" if m < 1e-3 else f"{m * 1e3:.1f} ms" if m < 1 else f"{m:.2f} s"
    return f"{side['name']}: {t}"


def render_markdown(report: dict[str, Any], report_name: str = "report.json", heading: str = "#",
                    chart_dir: str = "") -> str:
    """Markdown tables of a report: one table per group, every figure with ours, the peer, the
    ratio, its spread over rounds, the goal and pass/fail; not-run groups with their reason.
    ``chart_dir`` prefixes the charts' links (the report's folder as seen from the document)."""
    m, t = report["machine"], report["tier"]
    gpus = ", ".join(f"{g['name']} {g['memory_gb']} GB" for g in m["gpus"]) or "no GPU"
    load = m.get("load_average")
    lines = [
        f"{heading} aios-fast bench — {t['name']} tier{' (quick)' if report['quick'] else ''}",
        "",
        f"Produced by `{report['command']}` on {report['created']} (`{report_name}`).",
        "",
        f"- machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_gb']} GB RAM, {gpus}; "
        f"load average at start {load if load else 'n/a'}, at end {m.get('load_average_end') or 'n/a'}",
        *([f"- glibc malloc: {m['malloc']['reason']}"] if m.get("malloc") else []),
        f"- tier: {t['name']} ({'forced' if t['forced'] else 'detected'}; detected {t['detected']}: {t['reason']})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "- summary: " + ", ".join(f"{n} {k}" for k, n in sorted(report["summary"].items())),
        "",
    ]
    figs = {f["id"]: f for f in report["figures"]}
    for g in report["groups"]:
        lines.append(f"{heading}# {g['name']}")
        lines.append("")
        if g.get("load_average") and g["status"] == "run":
            lines.append(f"Load average when the group started: {g['load_average']}; {g['seconds']:.0f} s.")
            lines.append("")
        if g["status"] != "run":
            lines.append(f"**{g['status']}**: {g['reason']}")
            lines.append("")
        rows = [figs[i] for i in g["figures"] if i in figs]
        if rows:
            lines.append("| figure | ours (median) | peer (median) | ratio | spread over rounds | goal | status |")
            lines.append("|---|---|---|---|---|---|---|")
            for f in rows:
                goal = f["goal"]["text"] if f["goal"] else "—"
                status = f["status"] if not f["reason"] else f"{f['status']}: {f['reason']}"
                lines.append(f"| {f['title']} | {_secs(f['ours'])} | {_secs(f['peer'])} | **{format_value(f)}** | "
                             f"{_spread(f)} | {goal} | {status} |")
            lines.append("")
            checks = sorted({f["check"] for f in rows if f["check"]})
            if checks:
                lines.append("Checked: " + "; ".join(checks) + ".")
                lines.append("")
        if g.get("chart"):
            lines.append(f"![{g['name']}]({chart_dir}{g['chart']})")
            lines.append("")
    return "\n".join(lines)


def draw_chart(report: dict[str, Any], group: str, path: Path) -> Path | None:
    """A bar chart of one group's measured figures: one panel per unit (speed-ups on a log
    axis with 1× marked, overheads in % with 0 marked), each bar the median ratio with its
    spread over rounds, the goal as a black tick. None when the group has nothing measured."""
    figs = [f for f in report["figures"] if f["group"] == group and f["value"] is not None]
    if not figs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [(u, [f for f in figs if f["unit"] == u]) for u in ("x", "%", "s")]
    panels = [(u, fs) for u, fs in panels if fs]
    heights = [len(fs) for _, fs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.6 * sum(heights) + 1.2 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colours = {"pass": "tab:green", "fail": "tab:red", "info": "tab:blue", "incorrect": "tab:gray"}
    labels = {"x": "× faster than the peer (log scale; black tick = goal)",
              "%": "% extra time over the peer (black tick = goal)", "s": "seconds"}
    for ax, (unit, fs) in zip(axes[:, 0], panels):
        for i, f in enumerate(fs):
            v = f["value"]
            lo, hi = f["spread"] or (v, v)
            ax.barh(i, v, color=colours.get(f["status"], "tab:gray"), alpha=0.85,
                    xerr=[[max(v - lo, 0)], [max(hi - v, 0)]], capsize=3, ecolor="dimgray")
            ax.annotate(format_value(f), (v, i), xytext=(4, 6), textcoords="offset points", fontsize=8)
            if f["goal"]:
                ax.plot([f["goal"]["target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        ax.set_yticks(range(len(fs)), [_short(f["title"]) for f in fs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(labels[unit], fontsize=8)
        if unit == "x":
            ax.set_xscale("log")
            ax.axvline(1.0, color="gray", lw=0.8)
        elif unit == "%":
            ax.axvline(0.0, color="gray", lw=0.8)
    m = report["machine"]
    axes[0, 0].set_title(f"{group} — {report['tier']['name']} tier{' (quick)' if report['quick'] else ''}, "
                         f"{m['cores']} cores, {m['gpus'][0]['name'] if m['gpus'] else 'no GPU'} "
                         f"(bar: median of paired rounds; whiskers: min–max)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def _short(title: str, n: int = 60) -> str:
    return title if len(title) <= n else title[: n - 1] + "…"


def write_report(report: dict[str, Any], out: Path, charts: bool = True) -> Path:
    """Validate ``report`` and write report.json, report.md and the group charts into ``out``.
    Returns the path of report.json."""
    out.mkdir(parents=True, exist_ok=True)
    if charts:
        for g in report["groups"]:
            png = draw_chart(report, g["name"], out / f"{g['name']}.png")
            g["chart"] = png.name if png else None
    validate_report(report, str(out / "report.json"))
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())
    return atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())


def markers(name: str | None = None) -> tuple[str, str]:
    """The begin and end markers of a rendered block: ``<!-- bench-report:begin -->`` and
    ``<!-- bench-report:end -->``, or with `` NAME`` before ``-->`` for a named one (several
    reports, e.g. a Leaf and a Hub machine, in one file)."""
    if name is not None and not _MARKER_NAME.match(name):
        raise InputError(f"--name {name!r}: a block name is letters, digits, '_', '.' or '-'")
    tail = f" {name} -->" if name else " -->"
    return "<!-- bench-report:begin" + tail, "<!-- bench-report:end" + tail


def update_markdown_section(md_path: str | Path, report: dict[str, Any], report_path: str | Path,
                            name: str | None = None) -> Path:
    """Render ``report`` (read from ``report_path``) into ``md_path`` between its markers
    (:func:`markers`): the block between them is replaced, or, where the file has none, put
    after the last block already rendered there, else after the file's title and introduction
    (before its first section heading; at the end when it has none). Rendering the same report again leaves the file unchanged. Chart links
    point at the PNGs beside the report. Atomic. Returns ``md_path``."""
    md_path, report_path = Path(md_path), Path(report_path)
    try:
        text = md_path.read_text(encoding="utf-8") if md_path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{md_path}: cannot read the Markdown file to update: {exc}") from None
    begin, end = markers(name)
    rel = os.path.relpath(report_path.resolve().parent, md_path.resolve().parent)
    body = render_markdown(report, str(report_path), heading="##",
                           chart_dir="" if rel == "." else Path(rel).as_posix() + "/")
    block = f"{begin}\n{body.rstrip()}\n{end}"
    n_begin, n_end = text.count(begin), text.count(end)
    if n_begin != n_end or n_begin > 1 or (n_begin and text.index(begin) > text.index(end)):
        raise InputError(f"{md_path}: expected one {begin!r} followed by one {end!r}, found {n_begin} "
                         f"begin and {n_end} end marker(s); fix the file by hand")
    if n_begin:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    else:
        at = _after_blocks(text)
        head, tail = text[:at].rstrip("\n"), text[at:].lstrip("\n")
        text = (head + "\n\n" if head else "") + block + "\n" + ("\n" + tail if tail else "")
    return atomic_write_bytes(md_path, text.encode("utf-8"))


def _after_blocks(text: str) -> int:
    """Where a new block goes: after the last rendered block (of any name), so that blocks keep
    the order they were added in and never nest; else after the introduction."""
    last = text.rfind("<!-- bench-report:end")
    if last < 0:
        return _after_introduction(text)
    eol = text.find("\n", last)
    return len(text) if eol < 0 else eol + 1


def _after_introduction(text: str) -> int:
    """Where a new block goes: the start of the first section heading (``##`` or deeper)
    after the title, outside code fences; the end of the text when there is none."""
    pos, fence = 0, False
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            fence = not fence
        elif not fence and re.match(r"##+\s", stripped):
            return pos
        pos += len(line)
    return len(text)
