"""Which rows of a parameter a flat piece holds a nonzero in: the divergence check's reduction
over a ZeRO fragment (`orchestrator.master.row_absmax`), against the plain index computation."""

from __future__ import annotations

import math

import torch

from orchestrator.master import row_absmax


def _expected_nonzero(piece: torch.Tensor, start: int, per_row: int, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, dtype=torch.bool)
    out[torch.unique((torch.nonzero(piece != 0).flatten() + start) // per_row)] = True  # NaN != 0
    return out


def test_rows_with_a_nonzero_match_indices_for_every_offset_and_length():
    gen = torch.Generator().manual_seed(0)
    for rows, per_row in [(7, 5), (16, 9), (3, 1)]:
        full = torch.randn(rows * per_row, generator=gen)
        full[torch.rand(rows * per_row, generator=gen) < 0.9] = 0  # mostly zero rows, signed values
        full[per_row * 2] = -1.0  # at least one row holds a negative value only
        for start in range(rows * per_row):
            for n in {1, 3, per_row + 2, rows * per_row - start}:
                piece = full[start:start + n]
                got = row_absmax(piece, start, per_row, rows) != 0
                assert torch.equal(got, _expected_nonzero(piece, start, per_row, rows)), (rows, per_row, start, n)


def test_nan_and_denormal_rows_are_not_zero():
    w = torch.zeros(4, 6)
    w[1, 3] = math.nan
    w[2, 5] = 1e-45  # a float32 denormal: its square underflows, its magnitude does not
    nonzero = row_absmax(w.flatten()[2:], 2, 6, 4) != 0
    assert nonzero.tolist() == [False, True, True, False]
