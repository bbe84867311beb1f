"""What the machine can do, printed beside every time this project reports: the best FLOP/s of a square matmul. A
reader scales a duration measured here by the ratio of their machine's figure to this one."""
import time

import torch


def matmul_peak(device="cpu", dtype=torch.float32, n=4096, repeats=5):
    """Best FLOP/s of an n x n x n matmul over a few repeats (the best approximates the BLAS peak on a quiet
    machine)."""
    device = torch.device(device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
