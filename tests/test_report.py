"""The study report: report.md links every figure, report.html embeds each one as a base64 PNG and holds every table,
the fitted laws, the commands and the grid YAML; learning curves come from every cell's metrics.jsonl."""
import base64
import re

import pytest

from mambadm.study.compute_optimal import main as compute_optimal_main
from mambadm.study.report import main as report_main
from planted_law import write_results

GRID_YAML = "name: planted-isoflop\nstep_rule: isoflop\nflops_budgets: [1e12, 4e12]\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "study"
    csv = write_results(out, seeds=2, curves=True, families=("mambadm", "dt"))
    (out / "grid.yaml").write_text(GRID_YAML)
    (out / "scaling.md").write_text("# Scaling analysis\n\n## The paper's claim\n\n| family | verdict |\n|---|---|\n"
                                    "| dt | not answered |\n")
    assert compute_optimal_main([str(csv), "--boot", "20", "--plan", "2e14"]) == 0
    return out


def test_report_embeds_every_figure_and_table(study):
    md, page = (study / "report.md").read_text(), (study / "report.html").read_text()
    pngs = sorted(p.name for p in study.glob("*.png"))
    assert {"learning_curves.png", "isoflop.png", "frontier.png"} <= set(pngs)
    for name in pngs:
        assert f"]({name})" in md
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) == len(pngs) and all(src.startswith("data:image/png;base64,") for src in images)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in images}
    assert embedded == {(study / name).read_bytes() for name in pngs}  # each figure, byte for byte
    assert page.count("<table>") >= 5  # cells, isoFLOP profiles (2 families), leave-largest-out (2), claims
    for heading in ("How this study was made", "Grid", "Cells", "Figures", "Compute-optimal analysis",
                    "isoFLOP profiles", "Parametric L(N, D)", "Leave-largest-out", "Plan for C",
                    "Scaling analysis and the paper's claims"):
        assert heading in md and heading in page
    assert "not answered" in page  # the scaling analysis' own verdicts
    assert "step_rule: isoflop" in page and "python -m mambadm.study.compute_optimal" in page
    assert "configs/grid/planted-isoflop.yaml" in md
    cells = [line for line in md.splitlines() if line.startswith(("| mambadm-", "| dt-"))]
    assert len(cells) == 2 * 6 * 4 * 2  # every cell of results.csv: families × sizes × budgets × seeds
    assert "α = " in md and "[" in md  # the fitted law with its interval


def test_report_cli_names_missing_parts(tmp_path, capsys):
    assert report_main([str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    write_results(tmp_path, seeds=1)
    assert report_main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Not run: `python -m mambadm.study.compute_optimal" in md and "No `grid.yaml`" in md
