"""Which rows a flat piece of a parameter touches: the divergence check's reduction over a ZeRO
fragment, against the plain index computation it replaces (which sorted millions of indices)."""

from __future__ import annotations

import torch

from orchestrator.coordinator import _rows_touched


def test_rows_touched_matches_indices_for_every_offset_and_length():
    torch.manual_seed(0)
    for rows, per_row in [(7, 5), (16, 9), (3, 1)]:
        full = torch.rand(rows * per_row) < 0.05
        full[per_row * 2] = True  # at least one row is touched
        for start in range(rows * per_row):
            for n in {1, 3, per_row + 2, rows * per_row - start}:
                piece = full[start:start + n]
                expected = torch.zeros(rows, dtype=torch.bool)
                expected[torch.unique((torch.nonzero(piece).flatten() + start) // per_row)] = True
                assert torch.equal(_rows_touched(piece, start, per_row, rows), expected), (rows, per_row, start, n)
