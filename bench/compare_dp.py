"""Compares a 1-GPU and an N-GPU HawAda run of one data-parallel recipe (scripts/gpu-dp.sh):
gate logits and hard keep decisions, kept widths, median gate-step and fine-tune wall time, and
peak device memory per rank (memory/rank<N>.json). Prints a table; writes compare.json."""
import json
import statistics
import sys
from pathlib import Path

from safetensors.torch import load_file


def metrics(run):
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    adapt = [l for l in lines if l.get("stage") == "adapt" and l.get("step_s") is not None]
    # The first steps pay for cuDNN/cuBLAS autotuning and the allocator's growth.
    steady = [l["step_s"] for l in adapt[3:]] or [l["step_s"] for l in adapt]
    return statistics.median(steady), adapt


def memory(run):
    out = {}
    for f in sorted((run / "memory").glob("rank*.json")):
        m = json.loads(f.read_text())
        out[m["rank"]] = {
            stage: (m[stage]["peak_allocated_bytes"] / 2**30 if m.get(stage) else None)
            for stage in ("adapt", "finetune")
        }
    return out


def main(one, many):
    one, many = Path(one), Path(many)
    g1, g2 = load_file(str(one / "gates.safetensors")), load_file(str(many / "gates.safetensors"))
    diff = max((g1[k].float() - g2[k].float()).abs().max().item() for k in g1)
    same = sum(((g1[k] > 0) == (g2[k] > 0)).sum().item() for k in g1)
    total = sum(g1[k].numel() for k in g1)
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, many))
    (step1, a1), (step2, a2) = metrics(one), metrics(many)
    kd_diff = max(abs(x["kd"] - y["kd"]) / max(abs(x["kd"]), 1e-6) for x, y in zip(a1, a2))
    result = {
        "gate_logits_max_abs_diff": diff,
        "hard_decisions_agreeing": same / total,
        "gate_units": total,
        "worst_relative_kd_diff": kd_diff,
        "slim_widths_equal": s1["slim_widths"] == s2["slim_widths"],
        "median_gate_step_s": {"1": step1, "n": step2},
        "gate_step_speedup": step1 / step2,
        "wall_s": {"1": s1["wall_s"], "n": s2["wall_s"]},
        "speedup_of_slim_model": {"1": s1["speedup"], "n": s2["speedup"]},
        "peak_allocated_gib": {"1": memory(one), "n": memory(many)},
        "device": s1["device"],
    }
    (many / "compare.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\n{'':34}{'1 GPU':>12}{'N GPUs':>12}")
    print(f"{'median gate step (s)':34}{step1:12.4f}{step2:12.4f}   ×{step1 / step2:.2f}")
    for rank in sorted(set(result['peak_allocated_gib']['1']) | set(result['peak_allocated_gib']['n'])):
        m1 = result["peak_allocated_gib"]["1"].get(rank, {})
        m2 = result["peak_allocated_gib"]["n"].get(rank, {})
        for stage in ("adapt", "finetune"):
            a, b = m1.get(stage), m2.get(stage)
            fmt = lambda v: f"{v:12.2f}" if v is not None else f"{'-':>12}"
            print(f"{'peak GiB rank ' + str(rank) + ' ' + stage:34}{fmt(a)}{fmt(b)}")
    print(f"gate logits max |Δ| {diff:.3e}; hard decisions agreeing {same}/{total}; "
          f"worst relative KD Δ {kd_diff:.2e}; slim widths equal: {result['slim_widths_equal']}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
