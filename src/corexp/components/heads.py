"""Head selection (METHOD.md §4, §6): detection scores -> top-k, random control, published lists, layer bands; overlap.

Each option of the `heads` group is a selector class here (conf/heads/*.yaml names it in `_target_`): `AllHeads`
(ICR), `CoReHeads`, `QRHeads` (QRHead, both official drivers), `QRRHeads` (CoRe's QR-R baseline), `RandomHeads`,
`PublishedHeads`, `LayerHeads` (every head of a band of layers) and `WindowHeads` (the band of `width` layers that does
best on the detection set). A selector says whether it needs detection data, selects its heads for a model, re-selects
them among the layers a truncation keeps, and names itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from corexp.errors import CorexpError
from corexp.settings import Component, setting

Head = tuple[int, int]


def parse_head(label: str) -> Head:
    try:
        layer, head = str(label).split("-")
        return int(layer), int(head)
    except ValueError:
        raise CorexpError(f"head '{label}' is not of the form 'layer-head' (e.g. 15-21)") from None


def format_heads(heads: list[Head]) -> str:
    return ",".join(f"{l}-{h}" for l, h in heads)


def positive_values(values: np.ndarray, pos_index: np.ndarray) -> np.ndarray:
    """values[i, l, h, pos_index[i]] as (instances, layers, heads). values: (instances, layers, heads, docs)."""
    idx = np.broadcast_to(pos_index[:, None, None, None], (*values.shape[:3], 1))
    return np.take_along_axis(values, idx, axis=3)[..., 0]


def qr_r_scores(masses: np.ndarray, pos_index: np.ndarray) -> np.ndarray:
    """QR-R (CoRe's Table 1 baseline, its `qr_detector.py`): mean raw attention mass on the positive, no calibration."""
    return positive_values(masses, pos_index).mean(axis=0)


def qrhead_lme_scores(scores: np.ndarray, pos_index: np.ndarray) -> np.ndarray:
    """QRHead's long-context detection (QRScore, `detect_qrhead_lme.py`): mean over instances of the positive's
    calibrated, masked score under each head alone. scores: (instances, layers, heads, docs)."""
    return positive_values(scores.astype(np.float64), pos_index).mean(axis=0)


def ndcg_at_10(scores: np.ndarray, gains: np.ndarray, tie_rank: np.ndarray, ideal: np.ndarray | None = None) -> np.ndarray:
    """nDCG@10 of ranking each instance's documents by `scores` (..., instances, docs), linear gains (trec_eval's
    ndcg_cut.10); ties broken by `tie_rank` (instances, docs; lower first: trec_eval's descending document id).
    ideal: each instance's ideal DCG@10 (trec_eval: from all the query's judgments); None: from `gains`."""
    order = np.lexsort((np.broadcast_to(tie_rank, scores.shape), -scores), axis=-1)[..., :10]
    g = np.take_along_axis(np.broadcast_to(gains, scores.shape), order, axis=-1).astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, g.shape[-1] + 2))
    if ideal is None:
        ideal = (-np.sort(-gains, axis=-1)[..., :10] * discount[:gains[..., :10].shape[-1]]).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num((g * discount).sum(axis=-1) / ideal)


def qrhead_beir_scores(scores: np.ndarray, pos_index: np.ndarray, doc_ids: np.ndarray | None = None,
                       gains: np.ndarray | None = None, valid: np.ndarray | None = None, ideal: np.ndarray | None = None,
                       query_of: np.ndarray | None = None) -> np.ndarray:
    """QRHead's BEIR detection (`detect_qrhead_beir.py`): each head ranks every instance's documents by its calibrated,
    masked score and is scored by the mean nDCG@10 of those rankings, rounded to 5 decimals as BEIR's evaluation
    reports it (so heads tie as in the official code; ties: lower layer, then lower head). doc_ids break ties between
    documents as trec_eval does (descending id); without them, by prompt position. Judged instances (gains, valid,
    ideal, query_of: DetectionTable) are ranked once per query with its graded judgments and trec_eval's ideal DCG."""
    n_inst, n_docs = scores.shape[0], scores.shape[3]
    if query_of is not None:  # one ranking per query: its first instance
        first = np.unique(query_of, return_index=True)[1]
        pick = (lambda a: None if a is None else a[first])  # noqa: E731
        scores, pos_index, doc_ids, gains, valid, ideal = (pick(a) for a in (scores, pos_index, doc_ids, gains, valid, ideal))
        n_inst = scores.shape[0]
    if gains is None:
        gains = np.zeros((n_inst, n_docs))
        gains[np.arange(n_inst), pos_index] = 1.0
    if doc_ids is None:
        tie_rank = np.broadcast_to(np.arange(n_docs), (n_inst, n_docs))
    else:
        tie_rank = np.array([np.argsort(np.argsort(np.array(ids, dtype=str))[::-1]) for ids in doc_ids])
    values = scores.astype(np.float64)
    if valid is not None:  # padding never ranks
        values = np.where(valid[:, None, None, :], values, -np.inf)
    per_instance = ndcg_at_10(np.moveaxis(values, 0, 2), gains.astype(np.float64), tie_rank, ideal)  # (layers, heads, inst)
    return np.round(per_instance.mean(axis=-1), 5)


def core_scores(masses: np.ndarray, pos_index: np.ndarray, tau: float) -> np.ndarray:
    """Mean softmax probability of the positive among positive + negatives, temperature tau (stable log-sum-exp).
    A mass of -inf (DetectionTable.contrast_masses) takes no part."""
    z = masses.astype(np.float64) / tau
    z -= z.max(axis=3, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=3, keepdims=True))
    return np.exp(positive_values(logp, pos_index)).mean(axis=0)


def top_k(scores: np.ndarray, k: int, max_layer: int | None = None) -> list[Head]:
    """The k best heads (ties: lower layer, then lower head), optionally only among layers < max_layer."""
    n_layers, n_heads = scores.shape
    allowed = n_layers if max_layer is None else min(max_layer, n_layers)
    cands = [(float(scores[l, h]), l, h) for l in range(allowed) for h in range(n_heads)]
    check_k(k, len(cands))
    cands.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [(l, h) for _, l, h in cands[:k]]


def check_k(k: int, available: int) -> None:
    if k < 1 or k > available:
        raise CorexpError(f"heads.k={k} is out of range: choose 1..{available} (heads available)")


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    check_k(k, n_layers * n_heads)
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    return sorted(random.Random(seed).sample(pool, k))


def jaccard(a: list[Head], b: list[Head]) -> float:
    sa, sb = set(map(tuple, a)), set(map(tuple, b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def layer_stats(heads: list[Head], n_layers: int) -> dict[str, float]:
    """Where the selected heads sit: mean/min/max layer and the share in each third of the depth."""
    if not heads:
        return {}
    layers = np.array([l for l, _ in heads], dtype=float)
    thirds = np.floor(layers * 3 / n_layers).clip(0, 2)
    return {
        "layer_mean": float(layers.mean()), "layer_min": float(layers.min()), "layer_max": float(layers.max()),
        "share_lower_third": float((thirds == 0).mean()), "share_middle_third": float((thirds == 1).mean()),
        "share_upper_third": float((thirds == 2).mean()),
    }


@dataclass(frozen=True)
class DetectionTable:
    """Per instance, layer, head and document (METHOD.md §4): the raw attention mass (`masses`: CoRe, QR-R, windows)
    and the calibrated, masked score of the head alone (`scores`: QRHead); the positive's index per instance and the
    documents' ids (trec_eval's tie-break of QRHead's BEIR nDCG).

    Instances read from judged evaluation-style prompts (components/judged.py) also carry `gains` (each document's
    graded judgment: the other relevant candidates of the query take no part in its positive's contrast), `valid`
    (False: padding of a shorter candidate list), `ideal` (the query's ideal DCG@10 from all its judgments) and
    `query_of` (the query index of each instance: QRHead's nDCG is one value per query, not per positive)."""

    masses: np.ndarray
    pos_index: np.ndarray
    scores: np.ndarray | None = None
    doc_ids: np.ndarray | None = None
    gains: np.ndarray | None = None  # (instances, docs) graded judgments; None: the positive alone is relevant
    valid: np.ndarray | None = None  # (instances, docs) bool; None: every document
    ideal: np.ndarray | None = None  # (instances,) ideal DCG@10 of the instance's query
    query_of: np.ndarray | None = None  # (instances,) query index

    @property
    def instances(self) -> int:
        return int(self.masses.shape[0])

    def calibrated(self) -> np.ndarray:
        if self.scores is None:
            raise CorexpError("this detection table has no calibrated per-head scores (QRHead needs them)")
        return self.scores

    def members(self) -> np.ndarray | None:
        """(instances, docs) the documents that take part in each instance's contrast: its positive and the candidates
        judged non-relevant or unjudged (None: every document)."""
        if self.gains is None and self.valid is None:
            return None
        n, d = self.masses.shape[0], self.masses.shape[3]
        valid = np.ones((n, d), dtype=bool) if self.valid is None else self.valid
        negative = np.ones((n, d), dtype=bool) if self.gains is None else self.gains <= 0
        positive = np.zeros((n, d), dtype=bool)
        positive[np.arange(n), self.pos_index] = True
        return valid & (negative | positive)

    def contrast_masses(self) -> np.ndarray:
        """The raw masses with every document outside an instance's contrast at -inf (it takes no softmax share and
        never outranks the positive)."""
        members = self.members()
        if members is None:
            return self.masses
        return np.where(members[:, None, None, :], self.masses.astype(np.float64), -np.inf)


@dataclass(frozen=True)
class HeadSelection:
    """The heads a run uses (None: every head) and what to log about how they were chosen."""

    heads: list[Head] | None
    scores: np.ndarray | None = None  # the detection score of every head (layers x heads), when detected
    tau: float | None = None
    instances: int | None = None
    jaccard_core_qrhead: float | None = None  # overlap of CoRe's and QRHead's (long-context) top-k on the same table
    reselected: bool = False  # truncation removed selected heads; re-selected among the kept layers
    metric: str = ""
    window: tuple[int, int] | None = None  # heads=window: the chosen layers [start, end)
    window_scores: np.ndarray | None = None  # heads=window: the detection score of every window, by first layer

    @property
    def deepest_layer(self) -> int | None:
        return None if self.heads is None else max(layer for layer, _ in self.heads)


@dataclass(frozen=True)
class SelectionContext:
    """What a selector may read: the model's size, its default temperature and published lists, detection data."""

    n_layers: int
    n_heads: int
    model_tau: float = 0.1
    published: dict[str, list[str]] = field(default_factory=dict)
    detection: DetectionTable | None = None


class HeadSelector(Component):
    """One option of `heads`: which heads score the documents (METHOD.md §4, §6)."""

    needs_detection: ClassVar[bool] = False
    uses_every_head: ClassVar[bool] = False
    ignored_hint: ClassVar[str] = ""  # appended when a setting given for `heads` is ignored by this option

    @property
    def detection_shuffle(self) -> int | None:
        """The seed of a shuffle of every detection instance's documents this metric's official code applies
        (QRHead's BEIR driver), None: the instances as built."""
        return None

    def select(self, ctx: SelectionContext) -> HeadSelection:
        raise NotImplementedError

    def reselect(self, selection: HeadSelection, keep: int, ctx: SelectionContext) -> HeadSelection:
        """Heads among the first `keep` layers, when a truncation cut selected ones (this selector: it cannot)."""
        if selection.heads is None or selection.deepest_layer < keep:
            return selection
        raise CorexpError(f"truncation keeps {keep} layers but heads={self.name} selected layer {selection.deepest_layer}; "
                          "use truncation=auto or none")

    def check_dims(self, n_layers: int, n_heads: int) -> None:
        """Settings bounded by the model's size, checked from its config before any weight is loaded."""

    def temperature(self, model_tau: float) -> float | None:
        """The temperature of its score (CoRe's), None for other selectors."""
        return None

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        """Its name in run names and report rows (CoRe shows its temperature, resolved at the door)."""
        raise NotImplementedError


@dataclass(frozen=True)
class AllHeads(HeadSelector):
    """ICR: every (layer, head)."""

    key_name: ClassVar[str] = "ICR"

    name: ClassVar[str] = "all"
    uses_every_head: ClassVar[bool] = True
    ignored_hint: ClassVar[str] = " (ICR uses every head; heads=core, qrhead or random take a top-k)"

    def select(self, ctx: SelectionContext) -> HeadSelection:
        return HeadSelection(None, metric=self.name)

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "ICR"


@dataclass(frozen=True)
class CountedHeads(HeadSelector):
    """A selector that keeps k heads."""

    k: int = setting(8, ge=1, doc="heads kept")

    def check_dims(self, n_layers: int, n_heads: int) -> None:
        check_k(self.k, n_layers * n_heads)

    def k_label(self, base: str, hide: frozenset[str]) -> str:
        return base if "k" in hide else f"{base}-k{self.k}"


@dataclass(frozen=True)
class DetectedHeads(CountedHeads):
    """Top-k heads by a detection score (METHOD.md §4): one detection table serves both metrics."""

    needs_detection: ClassVar[bool] = True

    def metric_scores(self, table: DetectionTable, tau: float | None) -> np.ndarray:
        raise NotImplementedError

    def select(self, ctx: SelectionContext) -> HeadSelection:
        if ctx.detection is None:
            raise CorexpError(f"heads={self.name} needs detection data")
        table = ctx.detection
        tau = self.temperature(ctx.model_tau)
        scores = self.metric_scores(table, tau)
        overlap = None
        if table.scores is not None:  # CoRe and QRHead (long-context) from the same forward of the same instances
            core = core_scores(table.contrast_masses(), table.pos_index, float(tau if tau is not None else ctx.model_tau))
            overlap = jaccard(top_k(core, self.k), top_k(qrhead_lme_scores(table.scores, table.pos_index), self.k))
        return HeadSelection(top_k(scores, self.k), scores, tau, table.instances, overlap, metric=self.name)

    def reselect(self, selection: HeadSelection, keep: int, ctx: SelectionContext) -> HeadSelection:
        if selection.heads is None or selection.deepest_layer < keep:
            return selection
        return replace(selection, heads=top_k(selection.scores, self.k, max_layer=keep), reselected=True)


@dataclass(frozen=True)
class CoReHeads(DetectedHeads):
    """CoRe: top-k heads by the contrastive score (softmax of the positive's mass against the hard negatives')."""

    key_name: ClassVar[str] = "CoRe"

    name: ClassVar[str] = "core"
    k: int = setting(8, ge=1, doc="heads kept: the top-k by the score")
    tau: float | None = setting(None, gt=0, null="the model's tau", doc="softmax temperature of the contrastive score")

    def temperature(self, model_tau: float) -> float:
        return float(self.tau if self.tau is not None else model_tau)

    def metric_scores(self, table: DetectionTable, tau: float | None) -> np.ndarray:
        return core_scores(table.contrast_masses(), table.pos_index, float(tau))  # type: ignore[arg-type]

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return self.k_label("CoRe", hide) + ("" if "tau" in hide or self.tau is None else f" τ={self.tau}")


QRHEAD_BEIR_SEED = 42  # detect_qrhead_beir.py: random.seed(42) once, then one shuffle of each instance's documents


@dataclass(frozen=True)
class QRHeads(DetectedHeads):
    """QRHead (METHOD.md §4): each head scores the documents as QRHead re-ranks (N/A calibration, its own mean-2σ
    mask). variant=beir (the official BEIR driver, behind QRHead's BEIR tables): documents of every instance shuffled
    (seed 42), a head's score is the nDCG@10 of its rankings; variant=lme (the long-context driver, the paper's
    QRScore): documents as built, a head's score is the mean calibrated score of the positive."""

    key_name: ClassVar[str] = "QRHead"

    name: ClassVar[str] = "qrhead"
    k: int = setting(16, ge=1, doc="heads kept: the top-k by the score")
    variant: str = setting("beir", choices=("beir", "lme"),
                           doc="beir: nDCG@10 of each head's rankings, shuffled documents (QRHead's BEIR driver); "
                               "lme: mean calibrated score of the positive (its long-context QRScore)")

    @property
    def detection_shuffle(self) -> int | None:
        return QRHEAD_BEIR_SEED if self.variant == "beir" else None

    def metric_scores(self, table: DetectionTable, tau: float | None) -> np.ndarray:
        if self.variant == "lme":
            return qrhead_lme_scores(table.calibrated(), table.pos_index)
        return qrhead_beir_scores(table.calibrated(), table.pos_index, table.doc_ids, table.gains, table.valid, table.ideal,
                                  table.query_of)

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return self.k_label("QRHead" if "variant" in hide or self.variant == "beir" else f"QRHead-{self.variant}", hide)


@dataclass(frozen=True)
class QRRHeads(DetectedHeads):
    """QR-R, the query-focused baseline of CoRe's Table 1 (its `qr_detector.py`): top-k heads by the mean raw attention
    mass on the positive, one forward with the real query, no calibration (corexp's `heads=qrhead` before 2026-12)."""

    key_name: ClassVar[str] = "QRR"

    name: ClassVar[str] = "qr_r"
    k: int = setting(8, ge=1, doc="heads kept: the top-k by the score")

    def metric_scores(self, table: DetectionTable, tau: float | None) -> np.ndarray:
        return qr_r_scores(table.masses, table.pos_index)

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return self.k_label("QR-R", hide)


@dataclass(frozen=True)
class RandomHeads(CountedHeads):
    """Control: k heads drawn uniformly at random (seeded)."""

    key_name: ClassVar[str] = "Random"

    name: ClassVar[str] = "random"
    k: int = setting(8, ge=1, doc="heads drawn")
    seed: int = setting(0, ge=0, doc="seed of the draw")

    def select(self, ctx: SelectionContext) -> HeadSelection:
        return HeadSelection(random_heads(ctx.n_layers, ctx.n_heads, self.k, self.seed), metric=self.name)

    def reselect(self, selection: HeadSelection, keep: int, ctx: SelectionContext) -> HeadSelection:
        if selection.heads is None or selection.deepest_layer < keep:
            return selection
        return HeadSelection(random_heads(keep, ctx.n_heads, self.k, self.seed), reselected=True, metric=self.name)

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return self.k_label("random", hide)


@dataclass(frozen=True)
class PublishedHeads(CountedHeads):
    """The paper's head list of the model (model.published_heads[core], else its first list); its first k."""

    key_name: ClassVar[str] = "Published"

    name: ClassVar[str] = "published"
    k: int = setting(8, ge=1, doc="heads kept: the list's first k")

    def select(self, ctx: SelectionContext) -> HeadSelection:
        lists = ctx.published or {}
        key = "core" if "core" in lists else next(iter(lists), None)
        if key is None:
            raise CorexpError("this model has no published head list; use heads=core or heads=qrhead")
        heads = [parse_head(x) for x in lists[key]]
        check_k(self.k, len(heads))
        return HeadSelection(heads[:self.k], metric=self.name)

    def reselect(self, selection: HeadSelection, keep: int, ctx: SelectionContext) -> HeadSelection:
        if selection.heads is not None and selection.deepest_layer >= keep:
            raise CorexpError(f"truncation keeps {keep} layers but published heads reach layer {selection.deepest_layer}; "
                              "use truncation=auto or none")
        return selection

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return self.k_label("published", hide)


def layer_heads(start: int, end: int, n_heads: int) -> list[Head]:
    return [(layer, head) for layer in range(start, end) for head in range(n_heads)]


@dataclass(frozen=True)
class LayerHeads(HeadSelector):
    """Every head of the layers [start, end): ICR restricted to a band of layers (truncation=auto keeps layers < end)."""

    key_name: ClassVar[str] = "Layers"

    name: ClassVar[str] = "layers"
    start: int = setting(0, ge=0, doc="first layer of the band")
    end: int | None = setting(None, ge=1, null="the model's last layer + 1", doc="layer after the band (exclusive)")

    def bounds(self, n_layers: int) -> tuple[int, int]:
        return self.start, n_layers if self.end is None else self.end

    def check_dims(self, n_layers: int, n_heads: int) -> None:
        start, end = self.bounds(n_layers)
        if not 0 <= start < end <= n_layers:
            raise CorexpError(f"heads.start={start} heads.end={end} is not a band of this model's layers: use "
                              f"0 <= start < end <= {n_layers}")

    def select(self, ctx: SelectionContext) -> HeadSelection:
        start, end = self.bounds(ctx.n_layers)
        return HeadSelection(layer_heads(start, end, ctx.n_heads), metric=self.name)

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        end = "end" if self.end is None else str(self.end)
        return "layers" if {"start", "end"} <= hide else f"layers[{self.start},{end})"


def window_scores(masses: np.ndarray, pos_index: np.ndarray, width: int) -> np.ndarray:
    """Per window of `width` consecutive layers (by first layer): the mean reciprocal rank of the positive when the
    documents are scored by the attention mass of all the window's heads together (ICR's sum, restricted to the
    window). Ties count half. masses: (instances, layers, heads, docs)."""
    per_layer = masses.sum(axis=2)  # (instances, layers, docs)
    n_layers = per_layer.shape[1]
    out = np.zeros(n_layers - width + 1)
    rows = np.arange(per_layer.shape[0])
    for start in range(n_layers - width + 1):
        scores = per_layer[:, start:start + width].sum(axis=1)  # (instances, docs)
        pos = scores[rows, pos_index][:, None]
        rank = 1 + (scores > pos).sum(axis=1) + 0.5 * ((scores == pos).sum(axis=1) - 1)
        out[start] = float((1.0 / rank).mean())
    return out


@dataclass(frozen=True)
class WindowHeads(HeadSelector):
    """Every head of the window of `width` consecutive layers that ranks the positive best on the detection set (mean
    reciprocal rank of the positive under the window's summed attention mass); never chosen on evaluation queries."""

    key_name: ClassVar[str] = "Window"

    name: ClassVar[str] = "window"
    needs_detection: ClassVar[bool] = True
    width: int = setting(4, ge=1, doc="layers in the window")

    def check_dims(self, n_layers: int, n_heads: int) -> None:
        if self.width > n_layers:
            raise CorexpError(f"heads.width={self.width} is not allowed: use 1..{n_layers} (model layers)")

    def select(self, ctx: SelectionContext) -> HeadSelection:
        if ctx.detection is None:
            raise CorexpError("heads=window needs detection data")
        scores = window_scores(ctx.detection.contrast_masses(), ctx.detection.pos_index, self.width)
        start = int(np.argmax(scores))  # ties: the lowest window
        return HeadSelection(layer_heads(start, start + self.width, ctx.n_heads), None, None, ctx.detection.instances,
                             metric=self.name, window=(start, start + self.width), window_scores=scores)

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "window" if "width" in hide else f"window-w{self.width}"
