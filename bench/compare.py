"""Prints HawAda vs PyTorch eager, row by row, from `hawada bench` and torch_baseline.py JSON.

Ratio = HawAda mean / PyTorch's best mean for the same workload (≤ 1.0 means HawAda is at least
as fast). Several files per side (runs in A-B-B-A order) are averaged per row, so drift of the
card's clocks over the call cancels.
Usage: python3 bench/compare.py --hawada A1.json A2.json --torch B1.json B2.json
"""
import json
import sys


def best(rows, prefix):
    # "keep-all forward" also matches HawAda's "keep-all, BN unfolded forward" variant.
    head, _, tail = prefix.partition(" ")
    cands = [r for r in rows if r["name"].startswith(prefix) or (r["name"].startswith(head + ",") and tail in r["name"])]
    return min(cands, key=lambda r: r["latency_ms"]["mean"]) if cands else None


def average(paths):
    runs = [json.load(open(p)) for p in paths]
    merged = dict(runs[0])
    merged["rows"] = []
    for row in runs[0]["rows"]:
        same = [r for run in runs for r in run["rows"] if r["name"] == row["name"]]
        latency = {k: sum(r["latency_ms"][k] for r in same) / len(same) for k in ("mean", "p50", "p95")}
        merged["rows"].append({**row, "latency_ms": latency, "repeats": len(same)})
    return merged


def main():
    args = sys.argv[1:]
    split = args.index("--torch")
    ours = average(args[1:split])
    theirs = average(args[split + 1:])
    print(f"card: {ours['device']} | dtype {ours['dtype']} | PyTorch {theirs['torch']}")
    print(f"{'workload':<34} {'batch':>5} {'HawAda ms':>10} {'PyTorch ms':>11} {'ratio':>6}  PyTorch variant / HawAda variant")
    for workload in ["keep-all forward", "gate-training step", "slim forward"]:
        torch_row = best(theirs["rows"], workload)
        hawada_row = best(ours["rows"], workload)
        if not torch_row or not hawada_row:
            continue
        h, t = hawada_row["latency_ms"]["mean"], torch_row["latency_ms"]["mean"]
        print(f"{workload:<34} {hawada_row['batch']:>5} {h:>10.3f} {t:>11.3f} {h / t:>6.3f}  {torch_row['name']} / {hawada_row['name']}")
    for r in ours["rows"]:
        print(f"  hawada  {r['name']:<32} mean {r['latency_ms']['mean']:.3f} p95 {r['latency_ms']['p95']:.3f}" + (f" max|graph-eager| {r['max_abs_diff_vs_eager']:.2e}" if r.get("max_abs_diff_vs_eager") is not None else ""))
    for r in theirs["rows"]:
        print(f"  pytorch {r['name']:<32} mean {r['latency_ms']['mean']:.3f} p95 {r['latency_ms']['p95']:.3f}")


if __name__ == "__main__":
    main()
