"""fit(batching="adaptive") against mini-batch Adam, SGD and Rprop and full-batch
iRprop+ and L-BFGS at equal examples processed; prints Markdown tables.

The protocol is docs/benchmarks.md ("Mini-batches: adaptive batching"); the engine is
rprop._compare_minibatch (also behind ``rprop compare --minibatch``).

    python benchmarks/minibatch.py                          # the full protocol (hours)
    python benchmarks/minibatch.py --datasets digits,breast_cancer,diabetes \\
        --seeds 10 --tune-seeds 2                           # the small sets
    python benchmarks/minibatch.py --datasets noisy_class,teacher --synthetic-n 20000 \\
        --budgets 1,3,10 --seeds 3 --tune-seeds 1           # reduced synthetic sets
    python benchmarks/minibatch.py --sensitivity digits --seeds 5   # z, k, B0, window, rules
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from rprop import _compare_minibatch as cm

SENSITIVITY = [
    {}, {"z": 0.6}, {"z": 2.0}, {"micro_batches": 4}, {"micro_batches": 16},
    {"batch_size": 32}, {"batch_size": 128}, {"window": 3}, {"window": 30},
    {"unreliable": "hold"}, {"grow": "evidence"}, {"grow": "fraction"}, {"grow": "gain"},
]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(cm.DATASETS))
    ap.add_argument("--methods", default=",".join(cm.METHODS))
    ap.add_argument("--seeds", type=int, default=10, help="evaluation seeds S..S+N-1")
    ap.add_argument("--seed-start", type=int, default=0, metavar="S",
                    help="the first evaluation seed (default 0)")
    ap.add_argument("--tune-seeds", type=int, default=2,
                    help="tuning seeds 100..100+N-1 (never reported)")
    ap.add_argument("--budgets", type=_ints, default=list(cm.BUDGETS))
    ap.add_argument("--synthetic-n", type=int, default=100_000)
    ap.add_argument("--sensitivity", metavar="DATASET",
                    help="instead: the adaptive mode alone under each option change")
    ap.add_argument("--options", type=json.loads, metavar="JSON",
                    help="with --sensitivity: a JSON list of option dicts instead of the "
                         "built-in list, e.g. '[{}, {\"grow\": \"gain\"}]'")
    ap.add_argument("--reference", action="store_true",
                    help="also a long full-batch L-BFGS run per seed, and a table of the "
                         "objective each method has left to shed above it")
    ap.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.seed_start < 0:
        ap.error(f"--seed-start must be >= 0, got {args.seed_start}")
    tune_seeds = [100 + i for i in range(args.tune_seeds)]
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    if set(seeds) & set(tune_seeds):
        ap.error(f"--seed-start {args.seed_start} with --seeds {args.seeds} overlaps the "
                 f"tuning seeds {tune_seeds[0]}..{tune_seeds[-1]}")
    started = time.perf_counter()
    if args.sensitivity:
        print("| option | " + " | ".join(f"objective @{b} median [IQR]" for b in args.budgets)
              + " | full batch at (epochs) |")
        print("|---|" + "---:|" * (len(args.budgets) + 1))
        for opts in args.options or SENSITIVITY:
            res, chosen = cm.run([args.sensitivity], ["adaptive"], seeds, [], args.budgets,
                                 args.synthetic_n, options=opts)
            cells = []
            for b in args.budgets:
                q1, q2, q3 = cm._iqr([r.objective for r in res if r.budget == b])
                cells.append(f"{q2:.4g} [{q1:.3g}, {q3:.3g}]")
            full = [s["full_at"] for s in chosen[args.sensitivity]["schedules"].values()]
            full_text = ("never" if any(f is None for f in full)
                         else f"{statistics.median(full):.2f}")
            print(f"| {opts or 'defaults'} | " + " | ".join(cells) + f" | {full_text} |",
                  flush=True)
        print(f"\n{time.perf_counter() - started:.0f} s")
        return 0
    res, chosen = cm.run(args.datasets.split(","), args.methods.split(","), seeds,
                         tune_seeds, args.budgets, args.synthetic_n,
                         log=lambda s: print(s, file=sys.stderr, flush=True),
                         reference=args.reference)
    print(cm.format_tables(res))
    if args.reference:
        print("\nObjective left to shed above each seed's f* (medians over seeds):\n")
        print(cm.format_excess(res, {k: v["reference"] for k, v in chosen.items()}))
    for name, c in chosen.items():
        full = [s["full_at"] for s in c["schedules"].values()]
        print(f"\n{name}: tuned lr per budget {c['lr']}; adaptive reached full batch at "
              f"{[None if f is None else round(f, 2) for f in full]} epoch-equivalents")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [r.__dict__ for r in res],
                       "chosen": {k: {"lr": v["lr"], "schedules": {
                           str(s): {"batch_size": x["batch_size"], "full_at": x["full_at"]}
                           for s, x in v["schedules"].items()},
                           "reference": v["reference"]} for k, v in chosen.items()}},
                      f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
