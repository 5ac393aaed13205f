"""Every head's token scores of one prompt, real and N/A query, cached by content (METHOD.md §2-3, one forward per prompt).

A document score depends on the head set only through c_j(H) = sum over (l, h) in H of c_j^{l,h}, with
c_j^{l,h} = s_j^{l,h}(q) - s_j^{l,h}("N/A") for the document tokens j < q_start. One forward that reads every head
therefore scores *any* head set of the same model, prompt and candidates: ICR (all heads), CoRe/QRHead top-k, any
number of random draws, fusion variants. The table keeps s_j^{l,h}(q) and s_j^{l,h}("N/A") apart (heads x document
tokens each, fp32), so scoring without the N/A calibration needs no forward either. It is keyed on what the forward
reads and how it computes: model identity and dtype, device kind, torch/transformers versions, the read-out code
(attention.py's source), the real and N/A token ids and the query span. A job with `readout_cache=true` reads the
table when it covers its heads and otherwise computes and stores it (all heads of the layers the job loaded).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corexp.files import atomic_write_bytes, file_lock

TABLE_VERSION = "readout-table-v2"  # v2: real and N/A rows stored apart (v1: their difference)


def code_digest() -> str:
    """The read-out arithmetic (corexp/attention.py) and the libraries that run the forward."""
    import transformers

    from corexp.engine import attention

    src = Path(attention.__file__).read_bytes()
    return hashlib.sha256(src + f"|{torch.__version__}|{transformers.__version__}|{TABLE_VERSION}".encode()).hexdigest()


@dataclass
class HeadTable:
    """labels[i] = (layer, head) of row i; real / na: (rows, document tokens) token scores s_j of the real and the
    N/A query (fp32); calibrated = real - na, exactly the difference the direct read-out takes."""

    labels: list[tuple[int, int]]
    real: torch.Tensor
    na: torch.Tensor

    @property
    def calibrated(self) -> torch.Tensor:
        return self.real - self.na

    def covers(self, heads: list[tuple[int, int]] | None, n_layers: int) -> bool:
        have = set(self.labels)
        if heads is None:  # every head of the n_layers layers the job runs
            return {layer for layer, _ in have} >= set(range(n_layers)) and len(have) == len(self.labels)
        return all(tuple(h) in have for h in heads)

    def rows(self, heads: list[tuple[int, int]] | None, n_layers: int) -> list[int]:
        """Row indices of a head set (None: every head of the first n_layers layers), in (layer, head) order."""
        index = {lh: i for i, lh in enumerate(self.labels)}
        return [index[lh] for lh in sorted(self.labels) if lh[0] < n_layers] if heads is None else \
            [index[tuple(h)] for h in sorted(set(map(tuple, heads)))]

    def scores(self, heads: list[tuple[int, int]] | None, n_layers: int, calibrate: bool = True) -> torch.Tensor:
        """c_j of a head set (calibrate=False: s_j of the real query alone), summed over its heads."""
        rows = self.rows(heads, n_layers)
        return (self.calibrated[rows] if calibrate else self.real[rows]).sum(dim=0)


class ReadoutCache:
    """npz files under <cache_dir>/readout, one per (model identity, prompt), written atomically under a lock."""

    def __init__(self, cache_dir: Path | str, model_identity: str):
        self.folder = Path(cache_dir) / "readout"
        self.identity = model_identity
        self._code = code_digest()
        self.hits = 0

    def key(self, real_ids: torch.Tensor, na_ids: torch.Tensor, q_start: int) -> str:
        h = hashlib.sha256(f"{self.identity}|{self._code}|{q_start}|".encode())
        h.update(np.ascontiguousarray(real_ids.cpu().numpy(), dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.ascontiguousarray(na_ids.cpu().numpy(), dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def load(self, key: str) -> HeadTable | None:
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return HeadTable([tuple(map(int, x)) for x in z["labels"]], torch.from_numpy(z["real"]), torch.from_numpy(z["na"]))

    def store(self, key: str, table: HeadTable) -> None:
        buf = io.BytesIO()
        np.savez(buf, labels=np.array(table.labels, dtype=np.int64).reshape(-1, 2),
                 real=table.real.float().cpu().numpy(), na=table.na.float().cpu().numpy())
        with file_lock(self.folder / f".{key}.lock"):
            old = self.load(key)
            if old is None or len(old.labels) < len(table.labels):  # keep the table that covers more heads
                atomic_write_bytes(self.path(key), buf.getvalue())
