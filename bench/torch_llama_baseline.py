"""PyTorch eager baseline for `hawada bench` on a LLaMA recipe, run in the same call on the same
card: HF transformers' LlamaForCausalLM (SDPA attention) with the same config, random init, bf16,
eval, no grad, timed as HawAda times (10 warm-up, 50 timed, each synchronised):
  * prefill: one forward of BATCH x TOKENS with all logits (as HawAda's forward row);
  * decode: one new token per sequence after CONTEXT cached tokens, eager, as transformers'
    generation loop runs it: a DynamicCache prefilled with CONTEXT tokens, each timed call
    appending one (the context grows by the 60 warm-up + timed calls, ~12% at 512: slightly in
    HawAda's favour for attention, which is a small share of a step at these lengths).
  * generate: `model.generate` of NEW tokens (greedy, no early stop) after a PROMPT-token prompt,
    end to end (3 warm-up, 10 timed: one run is NEW eager decoding steps);
Also measures the card's device-to-device copy bandwidth and the time to read the weights once
at it, the floor for batch-1 decoding. With --hawada, prints HawAda / PyTorch ratios per row.

Usage: python3 bench/torch_llama_baseline.py --config models/llama-3.2-1b/config.json \
         --prefill 8x512 --decode 1@512 --decode 16@512 --generate 1@512+64 --out OUT/torch.json \
         [--hawada bench.json]
"""
import argparse
import json
import sys

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from torch_baseline import timeit


def bandwidth_gbs(device):
    n = 1 << 29 if device == "cuda" else 1 << 22  # 1 GiB of bf16 on the card
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    stats = timeit(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (stats["p50"] * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--prefill", action="append", default=[], help="BATCHxTOKENS")
    ap.add_argument("--decode", action="append", default=[], help="BATCH@CONTEXT")
    ap.add_argument("--generate", action="append", default=[], help="BATCH@PROMPT+NEW")
    ap.add_argument("--out", required=True)
    ap.add_argument("--hawada", help="HawAda bench.json to compare with")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke check)")
    args = ap.parse_args()
    raw = json.load(open(args.config))
    raw = {k: v for k, v in raw.items() if k not in ("channels_per_gate", "sublayer_gates") and not k.startswith("hawada_")}
    config = LlamaConfig(**raw, attn_implementation="sdpa")
    device = args.device
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    with torch.no_grad():
        for spec in args.prefill:
            batch, tokens = map(int, spec.split("x"))
            ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
            rows.append({"name": f"keep-all forward {tokens} tok (eager, transformers sdpa)", "batch": batch,
                         "latency_ms": timeit(lambda: model(input_ids=ids))})
        for spec in args.decode:
            batch, context = map(int, spec.split("@"))
            cache = DynamicCache()
            prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            step_ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
            rows.append({"name": f"keep-all decode @{context} (eager, transformers DynamicCache)", "batch": batch,
                         "latency_ms": timeit(lambda: model(input_ids=step_ids, past_key_values=cache, use_cache=True))})
        for spec in args.generate:
            batch, rest = spec.split("@")
            prompt, new = map(int, rest.split("+"))
            ids = torch.randint(0, config.vocab_size, (int(batch), prompt), device=device)
            run = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                         min_new_tokens=new, do_sample=False, pad_token_id=0)
            rows.append({"name": f"keep-all generate {prompt}+{new} (eager, transformers generate)", "batch": int(batch),
                         "latency_ms": timeit(run, warmup=3, timed=10)})
    bw = bandwidth_gbs(device)
    floor_ms = weight_bytes / (bw * 1e9) * 1e3
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
           "dtype": "bf16", "rows": rows, "weight_bytes": weight_bytes, "copy_bandwidth_gbs": bw, "weight_read_ms": floor_ms}
    json.dump(out, open(args.out, "w"), indent=2)
    print(f"card {out['device']} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"weights {weight_bytes / 1e9:.3f} GB | d2d copy bandwidth {bw:.0f} GB/s | one read of the weights {floor_ms:.3f} ms")
    for r in rows:
        print(f"  pytorch {r['name']:<58} b{r['batch']:<3} mean {r['latency_ms']['mean']:8.3f} p95 {r['latency_ms']['p95']:8.3f} ms")
    if args.hawada:
        ours = json.load(open(args.hawada))["rows"]
        print(f"{'workload':<30} {'batch':>5} {'HawAda ms':>10} {'PyTorch ms':>11} {'ratio':>6}  HawAda variant")
        for r in rows:
            prefix = r["name"].split(" (")[0]
            cands = [o for o in ours if o["name"].startswith(prefix) and o["batch"] == r["batch"]]
            if not cands:
                continue
            best = min(cands, key=lambda o: o["latency_ms"]["mean"])
            h, t = best["latency_ms"]["mean"], r["latency_ms"]["mean"]
            print(f"{prefix:<30} {r['batch']:>5} {h:>10.3f} {t:>11.3f} {h / t:>6.3f}  {best['name']}")
            if prefix.startswith("keep-all decode") and r["batch"] == 1:
                print(f"{'  vs one weight read':<30} {1:>5} {h:>10.3f} {floor_ms:>11.3f} {h / floor_ms:>6.3f}  (target ≤ 2.0)")
    sys.exit(0)


if __name__ == "__main__":
    main()
