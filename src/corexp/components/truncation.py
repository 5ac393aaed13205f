"""Truncation (METHOD.md §5): how many decoder layers a job loads and runs. One class per option of `truncation`.

Layers below l never depend on layers >= l, so a head's attention is identical in a model cut after its own layer:
`auto` keeps exactly the layers up to the deepest selected head (scores unchanged); `fraction` and `layers` cut
deeper and make head selectors re-select among the kept layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from corexp.errors import CorexpError
from corexp.settings import Component, setting


class Truncation(Component):
    def keep(self, n_layers: int, deepest_head_layer: int | None) -> int:
        """Layers to load and run, given the deepest selected head's layer (None: every head)."""
        raise NotImplementedError

    def effective(self, heads: Any) -> Truncation:
        """The truncation the job really has with this head selector (auto with every head is none)."""
        return self

    def check_dims(self, n_layers: int) -> None:
        """Settings bounded by the model's depth, checked from its config before any weight is loaded."""


@dataclass(frozen=True)
class NoTruncation(Truncation):
    """Every layer."""

    name: ClassVar[str] = "none"

    def keep(self, n_layers: int, deepest_head_layer: int | None) -> int:
        return n_layers


@dataclass(frozen=True)
class AutoTruncation(Truncation):
    """Keep the layers up to the deepest selected head (+1): identical scores, less time and memory."""

    name: ClassVar[str] = "auto"

    def keep(self, n_layers: int, deepest_head_layer: int | None) -> int:
        return n_layers if deepest_head_layer is None else deepest_head_layer + 1

    def effective(self, heads: Any) -> Truncation:
        return NoTruncation() if heads.uses_every_head else self

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "trunc=auto"


@dataclass(frozen=True)
class FractionTruncation(Truncation):
    """Drop the top fraction p of the layers: keep floor((1 - p) L), at least one."""

    name: ClassVar[str] = "fraction"
    fraction: float = setting(0.5, ge=0, lt=1, doc="share of the layers dropped from the top")

    def keep(self, n_layers: int, deepest_head_layer: int | None) -> int:
        return max(1, math.floor((1 - float(self.fraction)) * n_layers))

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "trunc=fraction" if "fraction" in hide else f"trunc=fraction:{self.fraction}"


@dataclass(frozen=True)
class LayerTruncation(Truncation):
    """Keep the first n layers."""

    name: ClassVar[str] = "layers"
    layers: int = setting(12, ge=1, doc="layers kept (at most the model's)")

    def keep(self, n_layers: int, deepest_head_layer: int | None) -> int:
        return int(self.layers)

    def check_dims(self, n_layers: int) -> None:
        if self.layers > n_layers:
            raise CorexpError(f"truncation.layers={self.layers} is not allowed: use 1..{n_layers} (model layers)")

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "trunc=layers" if "layers" in hide else f"trunc=layers:{self.layers}"
