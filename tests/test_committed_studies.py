"""The committed studies' results.csv files, re-analysed by today's code, still say what README and docs/scaling.md
read from them (so a change to the analysis that would change the published reading fails here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mambadm.study.scaling import analyse

STUDIES = Path(__file__).resolve().parents[1] / "docs" / "studies"


@pytest.mark.parametrize("study, metric", [("hopper-study", "normalized_mean"), ("breakout-study", "score_mean")])
def test_more_data_lowers_the_validation_loss_in_every_line(tmp_path, study, metric):
    result = analyse(STUDIES / study / "results.csv", tmp_path, metric=metric, n_boot=200)
    fits = result["fits"]["loss_vs_d"]
    assert len(fits) == len({(f["family"], f["fixed_n"]) for f in fits}) >= 4  # one line per family and size
    for fit in fits:
        assert fit["exponent_ci"][1] < 0, (study, fit["family"], fit["fixed_n"], fit["exponent_ci"])


def test_breakout_scores_rise_with_data_and_dt_gains_more_from_data_than_from_size(tmp_path):
    result = analyse(STUDIES / "breakout-study" / "results.csv", tmp_path, n_boot=200)
    claim = result["claim"]["per_family"]
    for family in ("dt", "mambadm"):
        assert claim[family]["spread_from"] == "seeds" and claim[family]["data_gain_ci"][0] > 0, family
    assert claim["dt"]["difference_ci"][0] > 0 and claim["dt"]["model_gain_ci"][0] < 0 < claim["dt"]["model_gain_ci"][1]
    assert not claim["mambadm"]["answered"]
    assert not result["family_claim"]["`score_mean`"]["answered"]
