"""Where a ViT's time goes outside its blocks, bf16 on the GPU: the patch embedding as cuDNN's
strided convolution vs the same product as a reshape + GEMM, and the bicubic interpolation of
DINOv2's position embeddings (37² → 16²), for ViT-S/14 and ViT-B/16 at 224², batch 64.
Timed like HawAda (10 warm-up, 50 timed, synchronised).

Usage: python3 bench/vit_patch_embedding.py
"""
import torch
import torch.nn.functional as F

from torch_baseline import timeit


def patchify_gemm(x, weight, bias, p):
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
    return F.linear(patches, weight.reshape(weight.shape[0], -1), bias)


def main():
    torch.backends.cudnn.benchmark = True
    dev, dt = "cuda", torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, p, d in [("ViT-S/14", 14, 384), ("ViT-B/16", 16, 768)]:
        x = torch.randn(64, 3, 224, 224, device=dev, dtype=dt)
        w = torch.randn(d, 3, p, p, device=dev, dtype=dt) * 0.02
        bias = torch.randn(d, device=dev, dtype=dt)
        with torch.no_grad():
            conv = lambda: F.conv2d(x, w, bias, stride=p).flatten(2).transpose(1, 2)
            gemm = lambda: patchify_gemm(x, w, bias, p)
            diff = (conv().float() - gemm().float()).abs().max().item()
            print(f"{name} patch embedding b64: conv2d {timeit(conv)['mean']:.3f} ms, reshape+GEMM {timeit(gemm)['mean']:.3f} ms, max|diff| {diff:.2e}")
    pos = torch.randn(1, 384, 37, 37, device=dev, dtype=torch.float32)
    with torch.no_grad():
        interp = lambda: F.interpolate(pos, size=(16, 16), mode="bicubic", align_corners=False).to(dt)
        print(f"DINOv2 position interpolation 37²→16² f32: {timeit(interp)['mean']:.3f} ms")


if __name__ == "__main__":
    main()
