"""A training-free step cache for the denoiser (First-Block-Cache / TeaCache style).

Between neighbouring flow-matching steps the DiT's output changes slowly over long stretches of the
schedule. Each step we run only the first triple block and measure, per batch row, how far its
audio output moved since the previous step (relative mean absolute change). Those changes are
accumulated since the row was last fully computed; while the sum stays under ``threshold`` the row
skips every remaining block and reuses the residual (final hidden state minus first-block output)
of its last full computation.

Decisions are made per batch row, so the two CFG branches (and the requests sharing a batch) keep
separate caches: the unconditional branch, whose inputs change least, skips most. Threshold 0 never
skips and takes the exact uncached code path. The first ``warmup`` steps always compute, because the
first steps move the latents most.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepCache:
    threshold: float
    warmup: int = 1
    # state
    residual: torch.Tensor | None = None  # [B, La, d] hidden - first-block output at the last computed step
    _previous: torch.Tensor | None = None  # [B, La, d] first-block output of the previous step
    _accumulated: torch.Tensor | None = None  # [B] change summed since the row's last computation
    _step: int = 0
    # accounting
    row_forwards: int = 0
    rows_skipped: int = 0
    calls_skipped: int = 0  # model calls where every row reused its residual
    calls: int = 0
    _pending_rows: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"step cache threshold must be >= 0, got {self.threshold}")

    def rows_to_compute(self, first: torch.Tensor) -> list[int] | None:
        """Rows to run through the remaining blocks; None means all of them.

        The change is accumulated on the device; the decision is read back once per step (one
        host sync, and only with the cache on), because which rows run decides the batch shape.
        """
        batch = first.shape[0]
        self.calls += 1
        self.row_forwards += batch
        if self.threshold == 0 or self._previous is None or self.residual is None or self._step < self.warmup:
            self._pending_rows = None
            return None
        prev = self._previous
        change = (first.float() - prev.float()).abs().mean(dim=(1, 2)) / prev.float().abs().mean(dim=(1, 2)).clamp_min(1e-12)
        acc = self._accumulated + change
        compute = ~(acc < self.threshold)  # a NaN change must recompute, not skip
        self._accumulated = torch.where(compute, torch.zeros_like(acc), acc)
        flags = compute.tolist()  # the one sync
        rows = [i for i, c in enumerate(flags) if c]
        self.rows_skipped += batch - len(rows)
        if len(rows) == batch:
            self._pending_rows = None
            return None
        if not rows:
            self.calls_skipped += 1
        self._pending_rows = rows
        return rows

    def store(self, first: torch.Tensor, hidden: torch.Tensor) -> None:
        rows = self._pending_rows
        if rows is None:
            self.residual = hidden - first
            self._accumulated = torch.zeros(first.shape[0], device=first.device)
        elif rows:
            index = torch.tensor(rows, device=first.device)
            self.residual[index] = hidden[index] - first[index]
        self._previous = first
        self._step += 1

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows (when cancelled requests leave a running batch)."""
        for name in ("residual", "_previous", "_accumulated"):
            value = getattr(self, name)
            if value is not None:
                index = torch.as_tensor(rows, dtype=torch.long).to(value.device)
                setattr(self, name, value.index_select(0, index))

    @property
    def saved_fraction(self) -> float:
        return self.rows_skipped / self.row_forwards if self.row_forwards else 0.0

    def report(self) -> dict[str, float | int]:
        return {
            "threshold": self.threshold,
            "model_calls": self.calls,
            "row_forwards": self.row_forwards,
            "rows_skipped": self.rows_skipped,
            "calls_skipped": self.calls_skipped,
            "saved_fraction": round(self.saved_fraction, 4),
        }
