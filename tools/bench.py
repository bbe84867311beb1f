"""
Speed and memory of model.py, printed (not a test: timings on a shared machine are noisy, so compare the ratios
measured in one run).

For each shape (tiny: 4 layers x 128; 124m: GPT-2 small), each in a fresh process so its peak memory is its own:
  train          tokens/s of a full AdamW step (forward, backward, update) and the achieved FLOP/s as a fraction of
                 this machine's measured matmul peak (FLOPs per token: 6 * parameters + 12 * layers * seq * width,
                 the PaLM appendix B count)
  sample-cache   new tokens/s sampling batch 16 x prompt 256 -> 48 new tokens with the KV cache
  sample-nocache the same, recomputing the whole sequence for every new token

    python tools/bench.py              # both shapes, the 124m no-cache case takes ~8 minutes on 2 CPU cores
    python tools/bench.py --shapes tiny    # a quick look
"""
import argparse
import json
import resource
import subprocess
import sys
import time

from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, PRESETS, GPTConfig, autocast, configure_optimizers, pick_dtype  # noqa: E402
from support.cli import pick_device  # noqa: E402

SHAPES = {"tiny": dict(n_layer=4, n_head=4, n_embd=128), "124m": PRESETS["gpt2"]}
TRAIN_BATCH = {"tiny": 16, "124m": 4}  # x 256 tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_peak(device, dtype):
    """Best FLOP/s of a square matmul: the yardstick for the training step."""
    n = 4096
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def bench_train(model, args, device, dtype):
    B, T = TRAIN_BATCH[args.shape], 256
    opt = configure_optimizers(model, lr=1e-4, weight_decay=0.1, device_type=device.type, verbose=False)
    x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    dt = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]  # median step
    cfg = model.config
    flops_per_token = 6 * model.num_params() + 12 * cfg.n_layer * T * cfg.n_embd
    return dict(tokens_per_s=B * T / dt, flops=flops_per_token * B * T / dt)


def sample_nocache(model, idx, n_new, temperature, generator):
    """Sampling without a cache: every new token re-runs the whole sequence (what the KV cache saves)."""
    mask = torch.ones_like(idx)
    for _ in range(n_new):
        logits = model(idx, mask, head_from=idx.size(1) - 1)[:, -1].float()
        tok = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
        idx = torch.cat([idx, tok], 1)
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
    return idx


@torch.no_grad()
def bench_sample(model, args, device, dtype, cached):
    B, T, N = 16, 256, 48
    idx = torch.randint(0, model.config.vocab_size, (B, T), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    best = float("inf")
    for _ in range(1 if not cached else args.repeats):
        sync(device)
        t = time.perf_counter()
        with autocast(device, dtype):
            if cached:
                # EOS never stops it: every row samples all 48 tokens, as in the no-cache loop
                out = model.generate(idx, max_new_tokens=N, temperature=1.0, generator=g)
            else:
                out = sample_nocache(model, idx, N, 1.0, g)
        sync(device)
        best = min(best, time.perf_counter() - t)
    assert out.shape == (B, T + N)
    return dict(tokens_per_s=B * N / best)


def run_case(args):
    """One measurement in this process; prints one JSON line for the parent."""
    torch.manual_seed(0)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    model = GPT(GPTConfig(**SHAPES[args.shape])).to(device)
    if args.compile:
        model = torch.compile(model)
    if args.case == "train":
        out = bench_train(model.train(), args, device, dtype)
    else:
        out = bench_sample(model.eval(), args, device, dtype, cached=args.case == "sample-cache")
    out["peak_mb"] = peak_memory_mb(device)
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "124m"], choices=list(SHAPES), help="model shapes")
    parser.add_argument("--cases", nargs="+", default=["train", "sample-cache", "sample-nocache"],
                        choices=["train", "sample-cache", "sample-nocache"], help="what to measure")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--repeats", type=int, default=2, help="cached sampling runs (the best is reported)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast dtype; auto = bf16 on GPUs that support it, fp32 otherwise")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        return run_case(args)

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    peak = matmul_peak(device, dtype)
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"matmul peak (4096^3, {str(dtype).removeprefix('torch.')}): {peak / 1e9:.1f} GFLOP/s\n")
    print(f"{'shape':<6} {'case':<15} {'tokens/s':>10} {'of peak':>8} {'peak MB':>9}   settings")
    results = {}
    for shape in args.shapes:
        for case in args.cases:
            cmd = [sys.executable, __file__, "--case", case, "--shape", shape, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--device", args.device,
                   "--dtype", args.dtype, "--threads", str(args.threads)] + (["--compile"] if args.compile else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{shape} {case} failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(shape, case)] = r
            frac = f"{r['flops'] / peak:.0%}" if "flops" in r else ""
            settings = f"batch {TRAIN_BATCH[shape]} x 256, AdamW" if case == "train" else "batch 16, prompt 256, +48"
            print(f"{shape:<6} {case:<15} {r['tokens_per_s']:>10.1f} {frac:>8} {r['peak_mb']:>9.0f}   {settings}",
                  flush=True)
    print()
    for shape in args.shapes:
        if (shape, "sample-cache") in results and (shape, "sample-nocache") in results:
            cache, nocache = results[(shape, "sample-cache")], results[(shape, "sample-nocache")]
            ratio = cache["tokens_per_s"] / nocache["tokens_per_s"]
            print(f"{shape}: KV cache speed-up {ratio:.1f}x (target >= 5x)")
        if (shape, "train") in results:
            print(f"{shape}: training step at {results[(shape, 'train')]['flops'] / peak:.0%} of the matmul peak"
                  + (" (target >= 60% at 124m)" if shape == "124m" else ""))


if __name__ == "__main__":
    main()
