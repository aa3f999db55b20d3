"""Warnings that a grid's numbers cannot carry a conclusion: episodes cut by a cap, scores at the dataset's best
return, validation loss that stopped moving early. Read from results.csv rows (columns written by `cell.py`; rows
of an older results.csv without them give no warning)."""
from __future__ import annotations

import math

TRUNCATED_MAJORITY = 0.5  # a cell whose evaluation episodes were mostly cut by the step / frame cap
SATURATED_SHARE = 0.98  # a score at >= 98% of the dataset's best episode return cannot rise much further
SETTLED_EARLY = 0.5  # validation loss that settled in the first half of training


def _finite(row: dict, key: str) -> float | None:
    v = row.get(key)
    return v if isinstance(v, float) and math.isfinite(v) else None


def _cells(rows: list[dict]) -> str:
    names = [r["cell"] for r in rows]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def truncated(rows: list[dict]) -> str | None:
    hit = [r for r in rows if (_finite(r, "truncated_share") or 0.0) > TRUNCATED_MAJORITY]
    if not hit:
        return None
    return (f"{len(hit)} of {len(rows)} cells had most evaluation episodes cut by the episode cap ('truncated'): "
            f"{_cells(hit)}. Their scores measure the cap as much as the policy; raise the cap "
            "(eval.args: --set max_episode_steps=... / max_episode_frames=...).")


def saturated(rows: list[dict]) -> str | None:
    hit = [r for r in rows if (best := _finite(r, "data_return_max")) is not None and best > 0
           and (score := _finite(r, "score_mean")) is not None and score >= SATURATED_SHARE * best]
    if not hit:
        return None
    best = max(r["data_return_max"] for r in hit)
    return (f"{len(hit)} of {len(rows)} cells score at the dataset's best episode return (>= "
            f"{100 * SATURATED_SHARE:.0f}% of {best:,.1f}, index.json 'returns.max'): {_cells(hit)}. The metric "
            "cannot rise further there, so neither more data nor a bigger model can show a gain.")


def settled_early(rows: list[dict]) -> str | None:
    hit = [r for r in rows if (step := _finite(r, "val_settled_step")) is not None
           and (steps := _finite(r, "steps")) and step <= SETTLED_EARLY * steps]
    if not hit:
        return None
    worst = min(hit, key=lambda r: r["val_settled_step"] / r["steps"])
    return (f"{len(hit)} of {len(rows)} cells' validation loss stopped moving (within 1% of its best) in the first "
            f"half of training, e.g. {worst['cell']} at step {worst['val_settled_step']:,.0f} of "
            f"{worst['steps']:,.0f}: {_cells(hit)}. Longer training would not change their loss.")


def caveats(rows: list[dict]) -> list[str]:
    """Every warning that applies to these results.csv rows (numeric columns as floats)."""
    return [w for w in (truncated(rows), saturated(rows), settled_early(rows)) if w]
