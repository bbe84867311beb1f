"""Side-environment CPU benchmark of Hugging Face GPT2LMHeadModel, as a yardstick for this repo's own GPT-2.

Run it in a side virtual environment that has ``transformers`` (never installed into the main environment), e.g.
``python3 -m venv --system-site-packages side && side/bin/pip install transformers``:

    side/bin/python tools/compare_hf.py --shape both --steps 5

It is NOT part of the runtime pipeline or of the tests; nothing in the repo imports it. It measures, on CPU in fp32 with
randomly initialised weights (no download):

* training throughput: tokens/s of forward + backward + AdamW step (dropout 0), after warm-up steps;
* sampling throughput: new tokens/s of ``generate(do_sample=True, top_k=0, temperature=1.0)`` for a batch of 16 prompts
  of 256 random ids producing exactly 48 new tokens, with and without the KV cache;
* this machine's fp32 matmul peak (best-of-N ``torch.mm``), so the model numbers can be read as fractions of it.

Shared/virtualised CPUs can change speed by several x from one second to the next (on the 2-vCPU dev box, 2-thread
matmul flips between ~230 and ~67 GFLOP/s). Each configuration therefore also records a short matmul probe right before
and right after it (``mm pre/post``), reports the best repetition next to the median, and the table should be read with
those probes in mind.

Each model configuration runs in its own spawned process so that the reported peak RSS (``ru_maxrss``, a process
high-water mark) belongs to that configuration alone rather than to everything measured before it.
"""

import argparse
import copy
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

import torch

SHAPES = {
    # GPT2Config() defaults: the 124M model (12 layers, 12 heads, 768 wide, 1024 positions, vocab 50257).
    "124m": dict(),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
}
TRAIN_BATCH = {"124m": 4, "tiny": 16}
SEQ_LEN = 256
GEN_BATCH, GEN_PROMPT, GEN_NEW = 16, 256, 48
# A timed generate configuration is repeated only while its total stays under this many seconds, so the slow
# 124M no-cache case runs once instead of blowing the time budget.
GEN_REPEAT_BUDGET_S = 120.0


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_probe(seconds: float = 0.5, n: int = 1024) -> float:
    """GFLOP/s of back-to-back n x n matmuls for about `seconds`: a cheap reading of the machine's current speed."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.mm(a, b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=c)
        count += 1
    return count * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def matmul_peak(reps: int) -> dict[str, float]:
    """Best-of-reps fp32 GFLOP/s of square torch.mm; the best run approximates the achievable BLAS peak."""
    out = {}
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.mm(a, b)  # warm-up: thread pool start-up and first-touch page faults
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
        out[f"mm{n}"] = 2 * n**3 / best / 1e9
    return out


def make_model(shape: str):
    from transformers import GPT2Config, GPT2LMHeadModel  # side env only

    cfg = GPT2Config(**SHAPES[shape], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg), cfg


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Approximate fwd+bwd FLOPs per token: 6 * (matmul params incl. the tied LM head) + causal-agnostic attention.

    The attention term 6 * n_layer * seq_len * n_embd counts QK^T and AV for a full (non-causal) square, as in the
    usual Kaplan et al. estimate; it is what a dense kernel actually computes.
    """
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    matmul_params = L * 12 * d * d + V * d
    return 6 * matmul_params + 6 * L * seq_len * d


def bench_train(shape: str, steps: int, warmup: int) -> dict:
    model, cfg = make_model(shape)
    model.train()  # dropout probabilities are 0, so train mode only matters for parity with a real training loop
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bsz = TRAIN_BATCH[shape]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (bsz, SEQ_LEN), generator=gen)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    tokens = bsz * SEQ_LEN
    return dict(kind="train", shape=shape, batch=f"{bsz}x{SEQ_LEN}", reps=steps, seconds=sum(times),
                tok_s=tokens / statistics.median(times), tok_s_best=tokens / min(times),
                flops_per_token=train_flops_per_token(cfg, SEQ_LEN), rss=peak_rss_mib(),
                attn=model.config._attn_implementation)


@torch.no_grad()
def bench_generate(shape: str, use_cache: bool, max_reps: int) -> dict:
    from transformers import GenerationConfig

    model, cfg = make_model(shape)
    model.eval()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (GEN_BATCH, GEN_PROMPT), generator=gen)
    mask = torch.ones_like(prompt)
    # min_new_tokens == max_new_tokens forces exactly GEN_NEW tokens per row (EOS is suppressed until then), so the
    # amount of work is identical across runs and shapes.
    gcfg = GenerationConfig(do_sample=True, top_k=0, temperature=1.0, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
                            use_cache=use_cache, pad_token_id=cfg.eos_token_id, eos_token_id=cfg.eos_token_id)
    # Short warm-up call: allocator and thread-pool start-up should not be billed to the timed runs.
    warm = copy.deepcopy(gcfg)
    warm.max_new_tokens = warm.min_new_tokens = 2
    model.generate(input_ids=prompt, attention_mask=mask, generation_config=warm)

    times = []
    while len(times) < max_reps:
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=mask, generation_config=gcfg)
        times.append(time.perf_counter() - t0)
        assert out.shape == (GEN_BATCH, GEN_PROMPT + GEN_NEW), out.shape
        if sum(times) > GEN_REPEAT_BUDGET_S:
            break
    new_tokens = GEN_BATCH * GEN_NEW
    return dict(kind="sample+cache" if use_cache else "sample nocache", shape=shape,
                batch=f"{GEN_BATCH}x({GEN_PROMPT}+{GEN_NEW})", reps=len(times), seconds=sum(times),
                tok_s=new_tokens / statistics.median(times), tok_s_best=new_tokens / min(times),
                flops_per_token=None, rss=peak_rss_mib(), attn=model.config._attn_implementation)


def _child(fn_name: str, args: tuple, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    pre = matmul_probe()
    res = globals()[fn_name](*args)
    res["mm_pre"], res["mm_post"] = pre, matmul_probe()
    queue.put(res)


def run_isolated(fn_name: str, args: tuple, threads: int) -> dict:
    """Run one benchmark in a fresh spawned process (clean ru_maxrss, no allocator state carried over)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn_name, args, threads, queue))
    t0 = time.perf_counter()
    proc.start()
    res = queue.get()  # read before join(): a child blocked on a full pipe would otherwise never exit
    proc.join()
    res["wall"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="CPU fp32 throughput of Hugging Face GPT-2 (side env only).")
    ap.add_argument("--shape", choices=["tiny", "124m", "both"], default="both",
                    help="model shape: 'tiny' (4 layers, 4 heads, 128 wide), '124m' (GPT2Config() defaults) or both")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per shape (after the warm-up steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps before timing")
    ap.add_argument("--gen-reps", type=int, default=3,
                    help="max timed generate calls per config (fewer once a config has used "
                    f"{GEN_REPEAT_BUDGET_S:.0f}s)")
    ap.add_argument("--mm-reps", type=int, default=5, help="repetitions per matmul size for the peak measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads (default: os.cpu_count())")
    ap.add_argument("--skip", default="", help="comma list of benchmarks to skip: train,cache,nocache")
    args = ap.parse_args()

    threads = args.threads
    torch.set_num_threads(threads)
    import transformers  # side env only

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"threads {threads}, cpu {platform.processor() or platform.machine()}")
    t0 = time.perf_counter()
    mm = matmul_peak(args.mm_reps)
    peak = max(mm.values())
    print(f"fp32 matmul peak: 2048^2 {mm['mm2048']:.1f} GFLOP/s, 4096^2 {mm['mm4096']:.1f} GFLOP/s "
          f"(best of {args.mm_reps}, {time.perf_counter() - t0:.1f}s)\n")

    skip = set(filter(None, args.skip.split(",")))
    shapes = ["tiny", "124m"] if args.shape == "both" else [args.shape]
    jobs = []
    for shape in shapes:
        if "train" not in skip:
            jobs.append(("bench_train", (shape, args.steps, args.warmup)))
        if "cache" not in skip:
            jobs.append(("bench_generate", (shape, True, args.gen_reps)))
        if "nocache" not in skip:
            jobs.append(("bench_generate", (shape, False, args.gen_reps)))

    header = (f"{'shape':6s} {'benchmark':15s} {'batch':14s} {'reps':>4s} {'tok/s med':>10s} {'tok/s best':>10s} "
              f"{'GFLOP/s':>8s} {'%peak':>6s} {'mm pre/post':>11s} {'RSS MiB':>8s} {'timed s':>8s} {'wall s':>7s}"
              "  attn")
    print(header)
    print("-" * len(header))
    for fn_name, fn_args in jobs:
        r = run_isolated(fn_name, fn_args, threads)
        if r["flops_per_token"]:  # achieved model FLOP/s, from the best step so it compares with the best-of matmul
            gflops = r["tok_s_best"] * r["flops_per_token"] / 1e9
            gfl, frac = f"{gflops:8.1f}", f"{100 * gflops / peak:5.1f}%"
        else:
            gfl, frac = f"{'-':>8s}", "-"
        probes = f"{r['mm_pre']:.0f}/{r['mm_post']:.0f}"
        print(f"{r['shape']:6s} {r['kind']:15s} {r['batch']:14s} {r['reps']:4d} {r['tok_s']:10.1f} "
              f"{r['tok_s_best']:10.1f} {gfl} {frac:>6s} {probes:>11s} {r['rss']:8.0f} {r['seconds']:8.1f} "
              f"{r['wall']:7.1f}  {r['attn']}", flush=True)
    print("\ntrain: tokens/s = batch*seq / step time (fwd+bwd+AdamW), median and best over the timed steps;")
    print("       GFLOP/s and %peak use the best step and ~6*(12*L*d^2 + V*d) + 6*L*T*d FLOPs per token.")
    print(f"sample: tokens/s = {GEN_BATCH}*{GEN_NEW} new tokens / generate() time, median and best over the reps.")
    print("mm pre/post: 1024^2 matmul GFLOP/s just before/after the config; 'timed s' sums the timed reps;")
    print("'wall s' adds process start, model init and warm-up.")


if __name__ == "__main__":
    main()
