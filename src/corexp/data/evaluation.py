"""Evaluation with ir_measures: per-query values and means, with MLflow-safe metric names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import ir_measures

from corexp.errors import CorexpError


def parse_measures(names: list[str]) -> list[Any]:
    try:
        return [ir_measures.parse_measure(str(n)) for n in names]
    except (ValueError, NameError, SyntaxError, TypeError) as err:
        raise CorexpError(f"cannot parse measure in {list(names)}: {err}; use ir_measures syntax such as nDCG@10") from None


def safe_name(measure: Any) -> str:
    """nDCG@10 -> nDCG_at_10, RR(rel=2) -> RR_rel_2: names MLflow accepts everywhere."""
    s = str(measure).replace("@", "_at_")
    s = re.sub(r"[^A-Za-z0-9_]+", "_", s)
    return s.strip("_")


@dataclass(frozen=True)
class Evaluation:
    """Mean per measure name and per-query values {query_id: {measure: value}} of one run."""

    means: dict[str, float]
    per_query: dict[str, dict[str, float]]

    def __iter__(self):  # (means, per_query) = evaluation
        return iter((self.means, self.per_query))


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, list[tuple[str, float]]], measures: list[Any]) -> Evaluation:
    """Means and per-query values; queries absent from the run score 0."""
    run_dict = {q: {d: float(s) for d, s in ranked} for q, ranked in run.items() if ranked}
    qrels_eval = {q: rels for q, rels in qrels.items() if q in run}
    per_query: dict[str, dict[str, float]] = {q: {} for q in qrels_eval}
    for m in ir_measures.iter_calc(measures, qrels_eval, run_dict):
        per_query.setdefault(m.query_id, {})[str(m.measure)] = float(m.value)
    for q in per_query:
        for m in measures:
            per_query[q].setdefault(str(m), 0.0)
    means = {str(m): (sum(v[str(m)] for v in per_query.values()) / len(per_query) if per_query else float("nan")) for m in measures}
    return Evaluation(means, per_query)
