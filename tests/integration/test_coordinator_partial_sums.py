"""Pruning events from per-filter partial norms (no gathered weights) against the gather path.

Unit part (CPU, no DeepSpeed): the row arithmetic on flat pieces that start and end in the
middle of a filter, as ZeRO fragments do, against the same computation on the whole tensor.

Integration part: over a real 2-process gloo group with real DeepSpeed engines, at ZeRO 0, 1
and 2 in fp32 and bf16, two identical engines run the same events, one through the partial-sum
path and one through the previous gather path (`Coordinator(gather=True)`): l1 and l2 scoring,
soft and hard masks, zeroed moments, regrowth statistics and norm control, and fpgm (which still
gathers its conv weights). Masks must be identical; module weights, full fp32 masters, moments
and BN buffers identical after zeroing events and within fp32 rounding (1e-6) after norm control,
whose factors come from norms summed in another order. bf16 module copies after norm control are
within one bf16 rounding: the gather path rounds master * c, the local path module * c (the next
`step()` copies the master back anyway).
"""

from __future__ import annotations

import json
import os
from itertools import pairwise

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator.driver import free_port
from tests.integration.test_orchestrator_zero_masks import _engine, _steps

# -- unit: row arithmetic on fragments ------------------------------------------------------------
# piece boundaries over a (5, 7) tensor: mid-row start and end, a piece inside one row, a single
# element, whole rows, an empty piece
CUTS = [0, 3, 5, 6, 17, 17, 21, 35]


def _pieces(flat: torch.Tensor):
    return [(lo, flat[lo:hi]) for lo, hi in pairwise(CUTS)]


def test_row_blocks_cover_each_element_once():
    from orchestrator.master import row_blocks

    per_row = 7
    for lo, hi in pairwise(CUTS):
        seen = []
        for row, a, b, k in row_blocks(lo, hi - lo, per_row):
            assert (b - a) % k == 0
            cols = (b - a) // k
            for i in range(k):  # every element of the block lies in the row the block names
                for j in range(cols):
                    flat = lo + a + i * cols + j
                    assert flat // per_row == row + i, (lo, hi, row, a, b, k)
                    seen.append(flat)
        assert seen == list(range(lo, hi))


@pytest.mark.parametrize("power", [1, 2])
def test_row_sums_over_fragments_are_filter_norms(power):
    from orchestrator.master import row_sums

    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    total = sum(row_sums(piece, start, 7, 5, power) for start, piece in _pieces(w.flatten()))
    want = w.abs().sum(1) if power == 1 else w.square().sum(1)
    assert torch.allclose(total, want, rtol=1e-6, atol=0)


def test_zero_and_scale_rows_on_fragments_match_whole_tensor():
    from orchestrator.master import scale_rows_, zero_rows
    from pruning.renorm import scale_rows

    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    drop = torch.tensor([False, True, False, True, True])
    c = torch.tensor([0.5, 2.0, 3.0, 0.25, 1.5])
    for power in (1, 2):
        flat = w.clone().flatten()
        for start, piece in _pieces(flat):
            scale_rows_(piece, start, 7, c, power)
        assert torch.equal(flat.view(5, 7), scale_rows(w, c, power))
    flat = w.clone().flatten()
    for start, piece in _pieces(flat):
        zero_rows(piece, start, 7, drop)
    assert torch.equal(flat.view(5, 7), w.masked_fill(drop[:, None], 0))


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_score_from_filter_scores_is_score_from_weights(criterion):
    """Coupled groups (a ResNet-56 stream): `_relative` and the slot means applied to precomputed
    per-conv scores give exactly the scores computed from the weights."""
    from models import create_model
    from pruning import build_groups, filter_scores, score
    from pruning.importance import FilterScores

    torch.manual_seed(0)
    model = create_model("resnet56", 10)
    groups = build_groups(model, policy="coupled")
    assert any(len(g.members) > 1 for g in groups)
    params = dict(model.named_parameters())
    per_conv = {c: filter_scores(params[f"{c}.weight"], criterion) for c in groups.convs()}
    want = score(groups, params, criterion)
    got = score(groups, FilterScores(criterion, per_conv), criterion)
    assert want.keys() == got.keys() and all(torch.equal(want[g], got[g]) for g in want)
    with pytest.raises(ValueError, match="coordinator's criterion"):
        score(groups, FilterScores("l1" if criterion != "l1" else "l2", per_conv), criterion)


# -- integration: partial-sum path against gather path --------------------------------------------
def _snapshot(coord) -> dict:
    """Module values, full fp32 masters, full moments and buffers. Collective under ZeRO."""
    params = coord._params
    keys = coord.master.moment_keys()
    return {"module": {n: p.detach().cpu().clone() for n, p in params.items()},
            "master": {n: coord.master.full(p) for n, p in params.items()},
            "moments": {f"{n}:{k}": m for k in keys for n, p in params.items()
                        if (m := coord.master.moment(p, k)) is not None},
            "buffers": {n: b.detach().cpu().clone() for n, b in coord._buffers.items()
                        if b.is_floating_point()}}


def _rel(a: dict, b: dict) -> float:
    """Largest |a - b| over all tensors, relative to the largest |b| of that tensor."""
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])
    return max(float((a[n].float() - b[n].float()).abs().max() / b[n].float().abs().max().clamp_min(1e-12))
               for n in a)


def _beyond_one_rounding(a: dict, b: dict) -> int:
    """Elements where bf16 module copies differ by more than one bf16 rounding (2^-7 relative)."""
    return sum(int(((a[n].float() - b[n].float()).abs() > b[n].float().abs() * 2 ** -7).sum()) for n in a)


def _compare(new: dict, old: dict) -> dict:
    return {"module": _rel(new["module"], old["module"]),
            "module_equal": all(torch.equal(new["module"][n], old["module"][n]) for n in old["module"]),
            "module_beyond_rounding": _beyond_one_rounding(new["module"], old["module"]),
            "master": _rel(new["master"], old["master"]),
            "moments": _rel(new["moments"], old["moments"]),
            "buffers": _rel(new["buffers"], old["buffers"])}


def _pair(stage: int, precision: str, rank: int, criterion: str):
    """Two identical engines after 2 steps, each with its coordinator: (new path, gather path)."""
    from orchestrator.coordinator import Coordinator
    from pruning import build_groups

    out = []
    for gather in (False, True):
        engine = _engine(stage, precision, lr=0.1)
        _steps(engine, 2, rank)  # moments exist
        groups = build_groups(engine.module, policy="sfp")
        out.append((engine, Coordinator(engine.module, groups, engine, criterion=criterion, gather=gather)))
    return out


def _case(stage: int, precision: str, rank: int, criterion: str, hard: bool, two_events: bool) -> dict:
    from pruning import score, select
    from pruning.renorm import layer_norms

    (eng_new, new), (eng_old, old) = _pair(stage, precision, rank, criterion)
    groups_new, groups_old = new.groups, old.groups
    result = {"before": _compare(_snapshot(new), _snapshot(old)), "hard": hard}  # identical starts

    def chooser(groups):
        return lambda t: select(groups, score(groups, t, criterion), 0.4)  # rank 0 only

    targets = {c: 0.5 * v for c, v in layer_norms(groups_old, old.full_tensors()).items()}
    m_new, _ = new.event(chooser(groups_new), hard=hard, zero_moments=True)
    m_old, _ = old.event(chooser(groups_old), hard=hard, zero_moments=True)
    result["event1"] = {**_compare(_snapshot(new), _snapshot(old)), "masks_equal": m_new.hash() == m_old.hash(),
                        "pruned": sum(int((~k).sum()) for k in m_old.keep.values())}
    if two_events:  # filters regrow, then a soft event with regrowth statistics and norm control
        _steps(eng_new, 2, rank)
        _steps(eng_old, 2, rank)
        m2_new, s2_new = new.event(chooser(groups_new), zero_moments=True, previous=m_new, norm_targets=targets)
        m2_old, s2_old = old.event(chooser(groups_old), zero_moments=True, previous=m_old, norm_targets=targets)
        grown = [abs(s2_new["regrowth"][c] - v) for c, v in s2_old["regrowth"].items()]
        result["event2"] = {**_compare(_snapshot(new), _snapshot(old)),
                            "masks_equal": m2_new.hash() == m2_old.hash(),
                            "regrowth_keys_equal": s2_new["regrowth"].keys() == s2_old["regrowth"].keys(),
                            "regrowth_diff": max(grown), "regrowth_max": max(s2_old["regrowth"].values()),
                            "norm_scale": [s2_new["norm_scale"], s2_old["norm_scale"]]}
    return result


def _worker(rank: int, port: int, stage: int, precision: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from orchestrator.engine import init_distributed

    init_distributed()
    result = {"l1_soft": _case(stage, precision, rank, "l1", hard=False, two_events=True),
              "l2_hard": _case(stage, precision, rank, "l2", hard=True, two_events=True),
              "fpgm_soft": _case(stage, precision, rank, "fpgm", hard=False, two_events=False)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    os._exit(0)  # see test_orchestrator_zero_masks: DeepSpeed/gloo threads may abort at teardown


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_partial_sum_events_match_gather_path(stage, precision, tmp_path):
    mp.spawn(_worker, args=(free_port(), stage, precision, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for name, case in res.items():
            before = case["before"]
            assert before["module_equal"] and before["master"] == before["moments"] == 0.0, (r, name, before)
            e1 = case["event1"]
            assert e1["masks_equal"] and e1["pruned"] > 0, (r, name, e1)
            # zeroing only: bit-identical everywhere
            assert e1["module_equal"] and e1["master"] == e1["moments"] == e1["buffers"] == 0.0, (r, name, e1)
            if "event2" not in case:
                continue
            e2 = case["event2"]
            assert e2["masks_equal"] and e2["regrowth_keys_equal"], (r, name, e2)
            assert e2["regrowth_diff"] < 1e-6 * max(1.0, e2["regrowth_max"]), (r, name, e2)
            assert case["hard"] or e2["regrowth_max"] > 0, (r, name, e2)  # soft: pruned filters regrew
            new_scale, old_scale = e2["norm_scale"]
            assert 0.2 < old_scale < 0.8 and abs(new_scale - old_scale) < 1e-6, (r, name, e2)
            assert e2["master"] < 1e-6 and e2["moments"] < 1e-6 and e2["buffers"] < 1e-6, (r, name, e2)
            if precision == "fp32":
                assert e2["module"] < 1e-6, (r, name, e2)
            else:
                assert e2["module_beyond_rounding"] == 0, (r, name, e2)
