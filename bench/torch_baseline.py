"""PyTorch eager baseline for `hawada bench`, run in the same call on the same card.

Times, with the shapes and dtype of the HawAda recipe:
  * torchvision ResNet-18 forward (eval, no grad), plain NCHW and channels-last;
  * the same gate-training step as HawAda's (teacher forward without grad, gated student forward
    with straight-through sampled channel gates on every block's inner channels and every stage's
    residual stream, tempered KD, backward to the gate logits only, Adam step);
  * the slim model `hawada bench` exported (its config.json + model.safetensors, torchvision
    names), plain and channels-last; its logits are compared with HawAda's export as a check.
Protocol as HawAda's: 10 warm-up runs, 50 timed runs, each synchronised; mean, p50, p95.

Usage: python3 bench/torch_baseline.py --slim-dir OUT/slim --batch 256 --step-batch 128 --out OUT/torch.json
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file

WARMUP, TIMED = 10, 50


def timeit(fn, warmup=WARMUP, timed=TIMED):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(timed):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    n = len(samples)
    rank = lambda q: samples[max(1, min(n, math.ceil(q * n))) - 1]
    return {"mean": sum(samples) / n, "p50": rank(0.5), "p95": rank(0.95), "runs": n}


class Block(nn.Module):
    """torchvision BasicBlock with free widths (names as torchvision's)."""

    def __init__(self, c_in, inner, c_out, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)) if downsample else None

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


class SlimResNet(nn.Module):
    """A BasicBlock ResNet (ImageNet stem) built from a HawAda slim config.json."""

    def __init__(self, cfg):
        super().__init__()
        base = cfg["base_width"]
        stem = cfg.get("stem_width", base)
        streams = cfg.get("stream_widths", [base << s for s in range(len(cfg["layers"]))])
        inner = cfg.get("inner_widths")
        self.conv1 = nn.Conv2d(cfg["num_channels"], stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in, flat = stem, 0
        for s, n in enumerate(cfg["layers"]):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                # topology from the original widths, as HawAda decides it
                orig_in = base if s == 0 else base << (s - 1)
                has_ds = b == 0 and (stride != 1 or orig_in != base << s)
                w = inner[flat][0] if inner else base << s
                blocks.append(Block(c_in, w, streams[s], stride, has_ds))
                c_in, flat = streams[s], flat + 1
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, cfg["num_labels"])
        self.n_stages = len(cfg["layers"])

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(self.n_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def gated_forward(model, x, masks):
    """torchvision ResNet-18 with HawAda's gate placement: stream masks after every write into a
    stage's residual stream, inner masks after each block's first conv."""
    stream, inner = masks
    h = F.relu(model.bn1(model.conv1(x))) * stream[0]
    h = model.maxpool(h)
    k = 0
    for s in range(4):
        for block in getattr(model, f"layer{s + 1}"):
            y = F.relu(block.bn1(block.conv1(h))) * inner[k]
            y = block.bn2(block.conv2(y)) * stream[s]
            identity = block.downsample(h) * stream[s] if block.downsample is not None else h
            h = F.relu(y + identity)
            k += 1
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def gate_step_fn(model, batch, dtype, channels_last, per_gate=8, tau=0.6667):
    widths = [64, 128, 256, 512]
    stream_logits = [torch.full((w // per_gate,), 3.0, device="cuda", requires_grad=True) for w in widths]
    inner_logits = [torch.full((w // per_gate,), 3.0, device="cuda", requires_grad=True) for w in widths for _ in range(2)]
    params = stream_logits + inner_logits
    opt = torch.optim.Adam(params, lr=0.1)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def sample(l):
        u = torch.rand_like(l).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((torch.log(u) - torch.log1p(-u) + l) / tau)
        hard = (soft > 0.5).float()
        z = soft + (hard - soft.detach())
        return z.repeat_interleave(per_gate).to(dtype).view(1, -1, 1, 1)

    def step():
        with torch.no_grad():
            t = model(x)
        s = gated_forward(model, x, ([sample(l) for l in stream_logits], [sample(l) for l in inner_logits]))
        temp = 2.0
        kd = F.kl_div((s / temp).log_softmax(-1, dtype=torch.float32), (t / temp).log_softmax(-1, dtype=torch.float32), reduction="sum", log_target=True) / batch * temp**2
        expected = sum(torch.sigmoid(l / tau).sum() for l in params)
        loss = kd + 1e-3 * expected
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slim-dir", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--step-batch", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    rows = []

    def forward_rows(name, model, batch):
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
        with torch.no_grad():
            rows.append({"name": f"{name} forward (eager, NCHW)", "batch": batch, "latency_ms": timeit(lambda: model(x))})
            cl = model.to(memory_format=torch.channels_last)
            xc = x.contiguous(memory_format=torch.channels_last)
            rows.append({"name": f"{name} forward (eager, channels-last)", "batch": batch, "latency_ms": timeit(lambda: cl(xc))})

    teacher = torchvision.models.resnet18(weights=None).cuda().to(dtype).eval()
    forward_rows("keep-all", teacher, args.batch)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for layout in ["NCHW", "channels-last"]:
        fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
        teacher = teacher.to(memory_format=fmt)
        step = gate_step_fn(teacher, args.step_batch, dtype, layout == "channels-last")
        rows.append({"name": f"gate-training step ({layout})", "batch": args.step_batch, "latency_ms": timeit(step)})

    cfg = json.load(open(f"{args.slim_dir}/config.json"))
    slim = SlimResNet(cfg)
    missing, unexpected = slim.load_state_dict(load_file(f"{args.slim_dir}/model.safetensors"), strict=False)
    assert not [m for m in missing if not m.endswith("num_batches_tracked")] and not unexpected, (missing, unexpected)
    slim = slim.cuda().to(dtype).eval()
    forward_rows("slim", slim, args.batch)

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "torchvision": torchvision.__version__, "dtype": args.dtype, "rows": rows}
    json.dump(out, open(args.out, "w"), indent=2)
    for r in rows:
        print(f"{r['name']:<40} b{r['batch']:<4} mean {r['latency_ms']['mean']:8.3f} ms  p95 {r['latency_ms']['p95']:8.3f} ms")


if __name__ == "__main__":
    main()
