"""PyTorch eager baseline for `hawada bench` on a ViT recipe: HF transformers'
ViTForImageClassification (SDPA attention) with the same config, bf16, eval, no grad, timed as
HawAda times (10 warm-up, 50 timed, synchronised). Writes rows compare.py reads.

Usage: python3 bench/torch_vit_baseline.py --config models/vit-b16/config.json --batch 64 --out OUT/torch.json
"""
import argparse
import json

import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

from torch_baseline import timeit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    raw = json.load(open(args.config))
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size", "num_channels", "qkv_bias", "num_labels", "layer_norm_eps"]
    config = ViTConfig(**{k: raw[k] for k in keys if k in raw}, hidden_act="gelu", attn_implementation="sdpa")
    torch.backends.cudnn.benchmark = True
    model = ViTForImageClassification(config).cuda().to(torch.bfloat16).eval()
    x = torch.randn(args.batch, config.num_channels, config.image_size, config.image_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        rows = [{"name": "keep-all forward (eager, transformers sdpa)", "batch": args.batch, "latency_ms": timeit(lambda: model(pixel_values=x))}]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__, "dtype": "bf16", "rows": rows}
    json.dump(out, open(args.out, "w"), indent=2)
    for r in rows:
        print(f"{r['name']:<46} b{r['batch']:<4} mean {r['latency_ms']['mean']:8.3f} ms  p95 {r['latency_ms']['p95']:8.3f} ms")


if __name__ == "__main__":
    main()
