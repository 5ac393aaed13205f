"""Evaluation with ir_measures: per-query values and means, with MLflow-safe metric names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import ir_measures

from corexp.data.datasets import TrecRun
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


def metric_key(stage: str, measure: Any) -> str:
    """The one name of a measure's value: `rerank.nDCG_at_10`, `first_stage.RR_rel_2` — MLflow metrics, the per-query
    table's columns and the report all use it (stage: first_stage | rerank)."""
    return f"{stage}.{safe_name(measure)}"


@dataclass(frozen=True)
class Evaluation:
    """Mean per measure name and per-query values {query_id: {measure: value}} of one run."""

    means: dict[str, float]
    per_query: dict[str, dict[str, float]]

    def __iter__(self):  # (means, per_query) = evaluation
        return iter((self.means, self.per_query))


def evaluate(qrels: dict[str, dict[str, int]], run: TrecRun, measures: list[Any]) -> Evaluation:
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


LENGTH_BIASED_RATIO = 0.5  # CoRe's length-bias test: the longest relevant candidate at most half the longest non-relevant


def gold_above_longest(ranking: Any, rels: dict[str, int], words: dict[str, int]) -> tuple[float, float] | None:
    """CoRe's length-bias test for one query: (1.0 when the best-ranked relevant candidate ranks above the longest
    non-relevant one, else 0.0; the length ratio longest relevant / longest non-relevant candidate, in words as the
    prompt shows them). None when the candidates hold no relevant or no non-relevant document. Relevant: judged > 0."""
    ids = [d for d, _ in ranking]
    relevant = [d for d in ids if rels.get(d, 0) > 0]
    other = [d for d in ids if rels.get(d, 0) <= 0]
    if not relevant or not other:
        return None
    longest = max(other, key=lambda d: (words[d], -ids.index(d)))  # ties: the first-stage's higher-ranked one
    ratio = max(words[d] for d in relevant) / max(words[longest], 1)
    best = min(ids.index(d) for d in relevant)
    return (1.0 if best < ids.index(longest) else 0.0), ratio
