"""Which filters the soft methods keep, when they stop changing their minds, and whether either
goes with what the shipped model scores.

Reads a finished comparison (its spec, compare.json and the runs' final/ folders; nothing
trains) and prints, per run and over its seeds:

  settled     the epoch from which no soft event flipped 1% of the mask slots
  churn       the share of the slots flipped, summed over the soft events (a rising rate's new
              zeros count too: ASFP's ramp to rate P adds at least P)
  overlap     per pruned conv, the share of the run's kept filters that `--against` kept at the
              same seed (same initial weights and batches), averaged over the convs; `chance`
              is what two random kept sets of those sizes share
and the Pearson correlation, over seeds, of churn and of overlap with the run's paired
held-out (else validation) top-1 gap to the baseline.

    python benchmarks/study_masks.py launch/compare_dev.yaml --runs sfp_nc_inner asfp_nc_inner \\
        --against pfec --seeds 0 1 2 3 4 5 6 7 8 9 10 11
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import storage
from orchestrator.compare import load_spec, mask_settling, plan_runs


def _read(output: str, name: str) -> dict:
    return json.loads(storage.read_text(storage.join(output, name)))


def kept_overlap(kept: dict[str, list[int]], other: dict[str, list[int]], channels: dict[str, int]) -> tuple[float, float]:
    """Mean over the convs both pruned of |kept ∩ other| / |kept|, and the same for random sets
    of those sizes (|other| / channels)."""
    convs = [c for c in kept if c in other and (len(kept[c]) < channels[c] or len(other[c]) < channels[c])]
    if not convs:
        raise ValueError("the two runs prune no conv in common")
    share = statistics.fmean(len(set(kept[c]) & set(other[c])) / len(kept[c]) for c in convs)
    chance = statistics.fmean(len(other[c]) / channels[c] for c in convs)
    return share, chance


def _corr(xs: list[float], ys: list[float]) -> str:
    return f"{statistics.correlation(xs, ys):+.2f}" if len(xs) > 2 and len(set(xs)) > 1 else "-"


def study(spec_path: str, runs: list[str], against: str, seeds: list[int], baseline: str | None = None) -> None:
    spec = load_spec(spec_path).with_seeds(seeds)
    baseline = baseline or spec.baseline
    output = {(p.run, p.seed): p.output for p in plan_runs(spec)}  # each run's final/, as compare finds it
    comparison = _read(spec.out_dir, "compare.json")
    key = "test_top1" if comparison.get("heldout") else "top1"
    base = comparison["runs"][baseline]["per_seed"]
    channels = {s: _read(output[baseline, s], "arch.json")["channels"] for s in seeds}
    other = {s: _read(output[against, s], "arch.json")["kept"] for s in seeds}
    print(f"{spec.name}: gap to {baseline} on {'held-out' if key == 'test_top1' else 'validation'} top-1, "
          f"overlap with {against}, seeds {seeds}")
    for run in runs:
        per_seed = comparison["runs"][run]["per_seed"]
        rows = []
        for s in seeds:
            settling = mask_settling(_read(output[run, s], "report.json"))
            share, chance = kept_overlap(_read(output[run, s], "arch.json")["kept"], other[s], channels[s])
            gap = 100 * (per_seed[str(s)][key] - base[str(s)][key])
            rows.append((settling["settled_epoch"], settling["churn_total"] or 0.0, share, chance, gap))
        settled = [r[0] for r in rows if r[0] is not None]
        churn, share, chance, gap = ([r[i] for r in rows] for i in range(1, 5))
        print(f"  {run}: settled at epoch {statistics.fmean(settled):.1f} ± {statistics.stdev(settled):.1f} "
              f"({len(rows) - len(settled)} never)  churn {statistics.fmean(churn):.2f} ± {statistics.stdev(churn):.2f}  "
              f"overlap {statistics.fmean(share):.3f} ± {statistics.stdev(share):.3f} (chance {statistics.fmean(chance):.3f})  "
              f"gap {statistics.fmean(gap):+.2f}")
        print(f"    per seed settled {[r[0] for r in rows]}")
        print(f"    correlation with the gap: churn {_corr(churn, gap)}, overlap {_corr(share, gap)} (n={len(rows)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the compare spec whose runs finished (e.g. launch/compare_dev.yaml)")
    parser.add_argument("--runs", nargs="+", required=True, help="soft runs of the spec to study")
    parser.add_argument("--against", required=True, help="the run whose kept filters they are compared with")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--baseline", help="the unpruned run the gaps are taken to (default: the spec's)")
    args = parser.parse_args()
    study(args.spec, args.runs, args.against, args.seeds, args.baseline)


if __name__ == "__main__":
    main()
