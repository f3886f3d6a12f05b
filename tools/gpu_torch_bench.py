#!/usr/bin/env python3
"""Yardsticks for `attnd bench-gpu`, run on the GPU machine (its python3 has torch): the bf16
matrix rate (8192^3, the ceiling for prefill) and torch's scaled_dot_product_attention on the
dense equivalents of the bench's shapes (no paging: contiguous K/V). Times are CUDA-event medians
after warm-up; inputs are random (never zeros). The last line is `matmul_tflops X` for the bench."""
import statistics

import torch
import torch.nn.functional as F


def time_ms(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    dev = torch.device("cuda")
    print("torch", torch.__version__, torch.cuda.get_device_name(0))
    n = 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = time_ms(lambda: x @ y, reps=10, warmup=3)
    matmul = 2 * n**3 / (ms / 1e3) / 1e12
    print(f"bf16 matmul {n}^3: {ms:.3f} ms, {matmul:.0f} TFLOP/s")
    del x, y
    for name, hq, hkv, d in (("llama3-8b", 32, 8, 128), ("h8-d64", 8, 8, 64)):
        for ctx in (1024, 8192):
            q = torch.randn(256, hq, 1, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(256, hkv, ctx + 1, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != hq))
            gb = 2 * k.numel() * 2 / 1e9
            print(f"sdpa decode {name} 256 x {ctx // 1024}K: {ms:.3f} ms, KV {gb / (ms / 1e3):.0f} GB/s")
            del q, k, v
        q = torch.randn(8, hq, 2048, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(8, hkv, 2048, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=hkv != hq))
        flop = 8 * hq * (2048 * 2049 / 2) * d * 4
        print(f"sdpa prefill {name} 8 x 2048 causal: {ms:.3f} ms, {flop / (ms / 1e3) / 1e12:.0f} TFLOP/s")
        del q, k, v
    print(f"matmul_tflops {matmul:.1f}")


if __name__ == "__main__":
    main()
