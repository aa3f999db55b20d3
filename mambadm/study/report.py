"""One report per study: `OUT/report.md` and a self-contained `OUT/report.html` (every figure inline as a base64 PNG).

    python -m mambadm.study.report OUT

Collects what the study's commands left in OUT: the commands that made it, the grid YAML (`grid.yaml`, written by
the grid runner), a table of every cell (`results.csv`), the compute-optimal analysis (`compute_optimal.md`), the
scaling analysis with its verdicts on the paper's claims (`scaling.md`), the learning curves of every cell (drawn
here from each cell's `run/metrics.jsonl` into `learning_curves.png`) and every PNG figure in OUT. Missing parts are
named with the command that makes them. The analysis commands call this at their end.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import markdown

from data_pipeline.atomic import atomic_write_text
from mambadm.model.base import TOKENS_PER_STEP
from mambadm.study.figures_compute import learning_curves_figure
from mambadm.study.scaling import model_size_column, read_results

FIGURE_ORDER = ("learning_curves.png", "isoflop.png", "frontier.png", "scaling.png")  # then any other PNG
CELL_COLUMNS = ("cell", "family", "size", "N", "transitions", "steps", "tokens", "epochs", "FLOPs", "best val loss",
                "final val loss", "score", "normalised")
HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}}
table{{border-collapse:collapse;font-size:0.85em;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 6px}}
th{{background:#f3f3f3}}img{{max-width:100%}}pre{{background:#f7f7f7;padding:0.8em;overflow-x:auto}}
code{{font-size:0.9em}}</style></head>
<body>
{body}
</body></html>
"""


def learning_curves(out: Path, rows: list[dict]) -> list[dict]:
    """Per finished cell: validation loss and training FLOPs at every validation of its run (metrics.jsonl)."""
    n_col = model_size_column(rows)
    curves = []
    for r in rows:
        metrics = out / "cells" / r["cell"] / "run" / "metrics.jsonl"
        if not metrics.is_file():
            continue
        flops, losses = [], []
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(rec.get("val_loss"), (int, float)) and isinstance(rec.get("flops"), (int, float)):
                flops.append(float(rec["flops"]))
                losses.append(float(rec["val_loss"]))
        if losses:
            curves.append({"cell": r["cell"], "family": r["family"], "size": r["size"], "n": r[n_col],
                           "flops": flops, "val_loss": losses})
    return curves


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:,.0f}" if v.is_integer() and abs(v) < 1e7 else f"{v:.4g}"
    return str(v)


def cells_table(rows: list[dict]) -> list[str]:
    """Every cell of results.csv as a Markdown table (epochs: tokens trained / (3 · unique transitions))."""
    n_col = model_size_column(rows)
    lines = ["| " + " | ".join(CELL_COLUMNS) + " |", "|---" * len(CELL_COLUMNS) + "|"]
    for r in rows:
        epochs = r["tokens"] / (TOKENS_PER_STEP * r["transitions"]) if r.get("transitions") else math.nan
        values = (r.get("cell", ""), r["family"], r["size"], r[n_col], r["transitions"], r.get("steps"),
                  r.get("tokens"), epochs, r.get("flops"), r.get("best_val_loss"), r.get("final_val_loss"),
                  r.get("score_mean"), r.get("normalized_mean"))
        lines.append("| " + " | ".join(_fmt(v) for v in values) + " |")
    return lines


def demoted(text: str) -> list[str]:
    """A Markdown document as a section of the report: every heading one level deeper."""
    return [("#" + line) if re.match(r"#{1,5} ", line) else line for line in text.splitlines()]


def first_command(log: Path) -> str | None:
    """The first command a cell's log records (`$ ...` lines, written by the grid's cell runner)."""
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("$ "):
                return line[2:]
    return None


def commands_section(out: Path, rows: list[dict], analysis_command: list[str] | None) -> list[str]:
    lines = ["## How this study was made", ""]
    grid = out / "grid.yaml"
    name = re.search(r"^name: *(\S+)", grid.read_text(), re.M) if grid.is_file() else None
    grid_file = f"configs/grid/{name.group(1)}.yaml" if name else "GRID.yaml"
    cmds = [f"python -m mambadm.grid {grid_file} --out {out}"]
    for log in ("train.log", "eval.log"):
        cmd = first_command(out / "cells" / rows[0]["cell"] / log) if rows else None
        if cmd:
            cmds.append(cmd + f"    # first cell, {log}")
    if (out / "scaling.md").is_file() and "scaling" not in " ".join(analysis_command or []):
        cmds.append(f"python -m mambadm.study.scaling {out / 'results.csv'}")
    if analysis_command:
        cmds.append(" ".join(analysis_command))
    return lines + ["```"] + cmds + ["```", ""]


def report_markdown(out: Path, image: Callable[[Path], str], analysis_command: list[str] | None = None) -> str:
    """The report as Markdown; `image(path)` gives each figure's link (a file name, or a data URI for HTML)."""
    results = out / "results.csv"
    rows = read_results(results) if results.is_file() else []
    lines = [f"# Study report: {out.name}", "",
             f"{len(rows)} finished cells in `{results.name}`. Sections: commands, grid, cells, figures, "
             "compute-optimal analysis, scaling analysis and the paper's claims, global vs local eigenvalues.", ""]
    lines += commands_section(out, rows, analysis_command)
    lines += ["## Grid", ""]
    grid = out / "grid.yaml"
    lines += (["```yaml", grid.read_text().rstrip(), "```", ""] if grid.is_file()
              else ["No `grid.yaml` in this folder (the grid runner writes it).", ""])
    lines += ["## Cells", ""] + (cells_table(rows) if rows else ["No results.csv."]) + [""]
    lines += ["## Figures", ""]
    pngs = sorted(out.glob("*.png"), key=lambda p: (FIGURE_ORDER.index(p.name) if p.name in FIGURE_ORDER
                                                    else len(FIGURE_ORDER), p.name))
    for png in pngs:
        lines += [f"### {png.stem.replace('_', ' ')}", "", f"![{png.stem}]({image(png)})", ""]
    for title, name, command in (
            ("Compute-optimal analysis", "compute_optimal.md", "python -m mambadm.study.compute_optimal"),
            ("Scaling analysis and the paper's claims", "scaling.md", "python -m mambadm.study.scaling"),
            ("Global vs local eigenvalues (the paper's third claim)", "branch_claim.md",
             "python -m mambadm.study.branch_claim")):
        lines += [f"## {title}", ""]
        part = out / name
        lines += (demoted(part.read_text())[1:] if part.is_file()
                  else [f"Not run: `{command} {results}` writes `{name}`."]) + [""]
    return "\n".join(lines)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(out: Path, analysis_command: list[str] | None = None) -> list[Path]:
    """Draws the learning curves, writes report.md (figures linked) and report.html (figures inline)."""
    results = out / "results.csv"
    rows = read_results(results) if results.is_file() else []
    curves = learning_curves(out, rows)
    if curves:
        learning_curves_figure(curves, out / "learning_curves.png")
    text = report_markdown(out, lambda p: p.name, analysis_command)
    body = markdown.markdown(report_markdown(out, data_uri, analysis_command), extensions=["tables", "fenced_code"])
    atomic_write_text(out / "report.md", text + "\n")
    atomic_write_text(out / "report.html", HTML_PAGE.format(title=html.escape(f"Study report: {out.name}"),
                                                            body=body))
    return [out / "report.md", out / "report.html"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the study's output folder (holding results.csv)")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"report: not a folder: {args.out}", file=sys.stderr)
        return 2
    try:
        paths = write_report(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
