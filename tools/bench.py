"""
Speed and memory of model.py, printed (not a test: timings on a shared machine are noisy, so compare the ratios
measured in one run).

For each shape (tiny: 4 layers x 128; 124m, 355m, 774m, 1558m: GPT-2's presets), each case in a fresh process so its
peak memory is its own:
  train           tokens/s of a full AdamW step (forward, backward, update) and the achieved FLOP/s as a fraction of
                  this machine's measured matmul peak (FLOPs per token: 6 * parameters + 12 * layers * seq * width,
                  the PaLM appendix B count)
  sample-cache    new tokens/s sampling --sample-batch x --prompt-len -> --new-tokens with the KV cache
  sample-compile  the same through the static cache and torch.compile (CUDA graphs on a GPU); the first call, which
                  compiles, is not timed
  sample-nocache  the same, recomputing the whole sequence for every new token
  sample-hf       the same with transformers' GPT2LMHeadModel.generate (sdpa attention), where transformers is installed
  attention       the attention alone, one layer's worth (--attn-batch x the shape's heads x --attn-len) on a
                  left-padded batch (--pad-frac of the positions padding on average): FlexAttention with its block
                  mask against SDPA with the same pattern as a dense mask, and the speed-up as a ratio
  score           a PPO scoring forward of a frozen model (reference or reward model) at the tldr shape: --score-batch
                  queries of up to 512 tokens, left padded (--pad-frac of the query positions on average), then 48
                  response tokens, through FlexAttention and through SDPA, and the speed-up
  rloo            the same update with ppo.py --estimator rloo: 4 samples a prompt, no value network
  ppo             one PPO update at the tldr settings (512 episodes, prompts of 512 tokens, 48 sampled, 4 epochs) with
                  random weights, through ppo.py's own rollout and update: episodes/s, the time split, peak memory and
                  the FLOP/s of the whole update against the matmul peak (6 * parameters per token trained, 2 per
                  token scored or sampled, the LM head on response tokens only; random weights rarely sample EOS,
                  so every response is 48 tokens long)

    python tools/bench.py                  # tiny and 124m, train and sampling; ~10 minutes on 2 CPU cores
    python tools/bench.py --shapes tiny    # a quick look
    python tools/bench.py --shapes 124m --cases sample-cache sample-compile sample-hf ppo --sample-batch 128 \
        --prompt-len 512 --compile          # on a GPU: docs/speed.md's side-by-side figures (tools/gpu_check.sh)
    python tools/bench.py --shapes 124m --cases attention score   # the two attention kernels side by side

The first FlexAttention call of a shape compiles (seconds on a CPU); it is reported apart and not timed. --attention
flex or sdpa runs the train, sample and ppo cases on one kernel (support/attention.py; on a CPU a model that trains
always runs SDPA: torch has no CPU backward for FlexAttention), and --pad-frac left-pads the train case's batch.
"""
import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time

from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, PRESETS, GPTConfig, autocast, pick_dtype  # noqa: E402
from support import attention  # noqa: E402
from support.cli import pick_device  # noqa: E402
from support.machine import matmul_peak  # noqa: E402
from support.optim import configure_optimizers  # noqa: E402

SHAPES = {"tiny": dict(n_layer=4, n_head=4, n_embd=128), "124m": PRESETS["gpt2"], "355m": PRESETS["gpt2-medium"],
          "774m": PRESETS["gpt2-large"], "1558m": PRESETS["gpt2-xl"]}
CASES = ["train", "sample-cache", "sample-compile", "sample-nocache", "sample-hf", "attention", "score", "ppo",
         "rloo"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_batch(args):
    return args.train_batch or (16 if args.shape == "tiny" else 4)


def bench_train(model, args, device, dtype):
    B, T = train_batch(args), args.train_len
    opt = configure_optimizers(model, lr=1e-4, weight_decay=0.1, device_type=device.type, verbose=False)
    x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)
    mask = left_padding(B, T + 1, args.pad_frac, device)[:, :-1] if args.pad_frac else None
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x[:, :-1], mask)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none")
        loss = loss.mean() if mask is None else (loss * mask.reshape(-1)).sum() / mask.sum()
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


def hf_model(cfg, device):
    """transformers' GPT-2 of the same shape, random weights, sdpa attention: the baseline for sampling speed."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hf_cfg = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size)
    return GPT2LMHeadModel(hf_cfg, attn_implementation="sdpa").to(device).eval()


@torch.no_grad()
def bench_sample(model, args, device, dtype, case):
    B, T, N = args.sample_batch, args.prompt_len, args.new_tokens
    idx = torch.randint(0, model.config.vocab_size - 1, (B, T), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    if case == "sample-hf":
        hf = hf_model(model.config, device)
        # min_new_tokens: every row samples all N tokens, as in the other cases; top_k 0: plain sampling, as ours
        run = lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=True, top_k=0,  # noqa: E731
                                  max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
    elif case == "sample-nocache":
        run = lambda: sample_nocache(model, idx, N, 1.0, g)  # noqa: E731
    else:  # EOS never stops it: every row samples all N tokens
        run = lambda: model.generate(idx, max_new_tokens=N, temperature=1.0, generator=g,  # noqa: E731
                                     compile=case == "sample-compile")
    best = float("inf")
    for i in range(1 if case == "sample-nocache" else args.repeats + (case == "sample-compile")):
        sync(device)
        t = time.perf_counter()
        with autocast(device, dtype):
            out = run()
        sync(device)
        if not (case == "sample-compile" and i == 0):  # the first compiled call compiles
            best = min(best, time.perf_counter() - t)
    assert out.shape == (B, T + N)
    return dict(tokens_per_s=B * N / best)


def left_padding(B, T, pad_frac, device):
    """(B, T) mask of left-padded rows whose lengths are spread evenly between (1 - 2 pad_frac) T and T: on average
    pad_frac of the positions are padding."""
    lengths = T - ((torch.arange(B) + 0.5) / B * 2 * pad_frac * T).long()  # evenly spread, so the mean is pad_frac
    return (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long().to(device)


def timed(run, device, repeats):
    """Seconds of the fastest of repeats calls, after one untimed call (which compiles, where anything does)."""
    sync(device)
    t = time.perf_counter()
    run()
    sync(device)
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, first


@torch.no_grad()
def bench_attention(args, device, dtype):
    """One layer's attention on a left-padded batch: FlexAttention (block mask) against SDPA (dense mask)."""
    from model import visible
    shape = SHAPES[args.shape]
    B, H, T, hs = args.attn_batch, shape["n_head"], args.attn_len, shape["n_embd"] // shape["n_head"]
    mask = left_padding(B, T, args.pad_frac, device).bool()
    q, k, v = torch.randn(3, B, H, T, hs, device=device, dtype=dtype)
    pattern = visible(attention.first_real(mask))
    attention.MODE = "flex"
    for _ in range(2):  # the first call warms up
        t = time.perf_counter()
        block_mask = attention.build(pattern, B, T, T, device, trainable=False)
        mask_s = time.perf_counter() - t
    dense = attention.dense(pattern, B, T, T, device)
    repeats = max(args.repeats, 10)  # tenths of a second each: enough calls that the best is not one lucky one
    flex_s, first = timed(lambda: attention.attend(q, k, v, block_mask, False, 0.0), device, repeats)
    sdpa_s, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), device, repeats)
    # One decoding step: a query at the last position against every cached key (the block mask of one step)
    step = lambda b, h, q_, k_: pattern(b, h, q_ + T - 1, k_)  # noqa: E731
    for _ in range(2):  # the first call warms up
        t = time.perf_counter()
        step_mask = attention.create_block_mask(step, B, None, 1, T, device=device,
                                                BLOCK_SIZE=attention.BLOCK.get(device.type, 128))
        step_mask_s = time.perf_counter() - t
    q1 = q[:, :, -1:].contiguous()
    flex1_s, _ = timed(lambda: attention.flex()(q1, k, v, block_mask=step_mask), device, repeats)
    sdpa1_s, _ = timed(lambda: F.scaled_dot_product_attention(q1, k, v, attn_mask=dense[:, :, -1:]), device, repeats)
    real = mask[:, None, :, None]
    diff = float(((attention.attend(q, k, v, block_mask, False, 0.0) - F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense)).abs() * real).max())
    return dict(flex_ms=flex_s * 1e3, sdpa_ms=sdpa_s * 1e3, compile_s=first - flex_s, block_mask_ms=mask_s * 1e3,
                pad_frac=1 - float(mask.float().mean()), max_diff=diff, decode_flex_ms=flex1_s * 1e3,
                decode_sdpa_ms=sdpa1_s * 1e3, decode_mask_ms=step_mask_s * 1e3)


@torch.no_grad()
def bench_score(args, device, dtype):
    """A frozen model's forward over tldr episodes (query up to 512, left padded, + 48), on each kernel."""
    cfg = GPTConfig(**SHAPES[args.shape])
    model = GPT(cfg).to(device).eval().requires_grad_(False)
    B, Q, R = args.score_batch, 512, 48
    mask = torch.cat([left_padding(B, Q, args.pad_frac, device), torch.ones(B, R, dtype=torch.long, device=device)], 1)
    tokens = torch.randint(0, cfg.vocab_size, (B, Q + R), device=device) * mask + cfg.vocab_size * (1 - mask)
    out = dict(pad_frac=1 - float(mask.float().mean()))
    for mode in ("flex", "sdpa"):
        attention.MODE = mode
        with autocast(device, dtype):
            seconds, first = timed(lambda: model(tokens, mask, head_from=Q - 1), device, args.repeats)
        out[f"{mode}_ms"], out[f"{mode}_compile_s"] = seconds * 1e3, first - seconds
    return out


def bench_ppo(args, device, dtype):
    """One PPO update of ppo.py at the tldr settings, random weights; a first update warms up (and compiles).
    The rloo case: the same with --estimator rloo (no value network)."""
    import tempfile

    import ppo
    from support import ppo_run
    task = ppo.data.TASKS["tldr"]
    flags = ["--task", "tldr", "--out-dir", tempfile.mkdtemp(), "--micro-batch-size", str(args.micro_batch),
             "--rollout-batch-size", str(args.ppo_batch), "--minibatch-size", str(min(64, args.ppo_batch))]
    flags += (["--compile"] if args.compile else []) + (["--sample-batch-size", str(args.ppo_sample_batch)]
                                                        if args.ppo_sample_batch else [])
    rloo = args.case == "rloo"
    flags += ["--estimator", "rloo"] if rloo else []
    pargs = ppo.parse_args(flags)
    cfg = GPTConfig(**SHAPES[args.shape])
    policy, ref = GPT(cfg).to(device), GPT(cfg).to(device).eval().requires_grad_(False)
    value, rm = (GPT(GPTConfig(**SHAPES[args.shape], head="scalar")).to(device) for _ in range(2))
    rm.eval().requires_grad_(False)
    value = None if rloo else value
    trained = [m for m in (policy, value) if m is not None]
    optimizer = configure_optimizers(torch.nn.ModuleList(trained), 1e-6, device_type=device.type, verbose=False)
    train_policy, train_value = (torch.compile(m) if args.compile and m is not None else m for m in (policy, value))
    n, pad, eos = pargs.rollout_batch_size, cfg.vocab_size, cfg.vocab_size - 1
    pargs.sample_batch_size = ppo_run.episodes_sampled_at_once(pargs, policy, device, dtype)
    queries = torch.randint(0, cfg.vocab_size - 1, (n, task["query_len"]), device=device)
    for update in range(2):
        sync(device)
        batch, seconds = ppo.rollout(policy, ref, value, rm, queries, ppo.episode_seeds(0, update, n), pargs, pad,
                                     eos, device, dtype)
        batch = ppo.add_advantages(batch, 0.05, pargs)
        sync(device)
        t = time.perf_counter()
        ppo.ppo_update(train_policy, train_value, optimizer, batch, 1e-6, update, pargs, pad, device, dtype)
        sync(device)
        seconds["training_s"] = time.perf_counter() - t
    # FLOPs per episode: 2 per parameter per token forward, 6 forward and backward. The language-model head only
    # runs on the response's positions; the scalar models have none.
    T, R = task["query_len"] + task["response_len"], task["response_len"]
    head = policy.lm_head.weight.numel()
    lm, scalar = 2 * ((policy.num_params() - head) * T + head * R), 2 * (policy.num_params() - head) * T
    scalars = 1 if rloo else 2  # the reward model, and PPO's value network
    flops = n * (3 * lm + scalars * scalar + 3 * pargs.ppo_epochs * (lm + (scalars - 1) * scalar))
    total = sum(seconds.values())
    return dict(episodes_per_s=n / total, flops=flops / total, sample_batch=pargs.sample_batch_size, **seconds)


def run_case(args):
    """One measurement in this process; prints one JSON line for the parent."""
    torch.manual_seed(0)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    attention.MODE = args.attention
    if args.case in ("ppo", "rloo", "attention", "score"):
        out = dict(ppo=bench_ppo, rloo=bench_ppo, attention=bench_attention, score=bench_score)[args.case](
            args, device, dtype)
    else:
        model = GPT(GPTConfig(**SHAPES[args.shape])).to(device)
        if args.case == "train":
            out = bench_train((torch.compile(model) if args.compile else model).train(), args, device, dtype)
        else:
            out = bench_sample(model.eval(), args, device, dtype, args.case)
    out["peak_mb"] = peak_memory_mb(device)
    print(json.dumps(out))


def settings(case, shape, args):
    if case == "train":
        padded = f", {args.pad_frac:.0%} left padding, attention {args.attention}" if args.pad_frac else ""
        return f"batch {train_batch(argparse.Namespace(**{**vars(args), 'shape': shape}))} x {args.train_len}, AdamW" \
            + padded
    if case == "attention":
        heads, width = SHAPES[shape]["n_head"], SHAPES[shape]["n_embd"]
        return f"batch {args.attn_batch} x {heads} heads x {args.attn_len}, head size {width // heads}, one layer"
    if case == "score":
        return f"batch {args.score_batch}, query up to 512 + 48, frozen model"
    if case in ("ppo", "rloo"):
        return (f"tldr: {args.ppo_batch} episodes, prompts 512, +48, 4 epochs, micro-batch {args.micro_batch}"
                + (", 4 samples a prompt, no value network" if case == "rloo" else ""))
    return f"batch {args.sample_batch}, prompt {args.prompt_len}, +{args.new_tokens}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "124m"], choices=list(SHAPES), help="model shapes")
    parser.add_argument("--cases", nargs="+", default=["train", "sample-cache", "sample-nocache"], choices=CASES,
                        help="what to measure")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--train-batch", type=int, help="training sequences per step (default: 16 tiny, 4 otherwise)")
    parser.add_argument("--train-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--sample-batch", type=int, default=16, help="sequences sampled at once")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens before sampling")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens sampled after the prompt")
    parser.add_argument("--repeats", type=int, default=2, help="cached sampling runs (the best is reported)")
    parser.add_argument("--ppo-batch", type=int, default=512, help="ppo: episodes per update (the paper's 512; "
                        "fewer for a quick look on a CPU)")
    parser.add_argument("--micro-batch", type=int, default=16, help="ppo: ppo.py's --micro-batch-size")
    parser.add_argument("--ppo-sample-batch", type=int, help="ppo: ppo.py's --sample-batch-size (default: its own)")
    parser.add_argument("--attn-batch", type=int, default=16, help="attention: sequences")
    parser.add_argument("--attn-len", type=int, default=512, help="attention: positions per sequence")
    parser.add_argument("--score-batch", type=int, default=16, help="score: episodes per forward")
    parser.add_argument("--pad-frac", type=float, default=None, help="the average fraction of positions that are "
                        "left padding (default: 0.4 for attention, 0.3 of the query for score, none for train)")
    parser.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"], help="which attention "
                        "kernel padded forwards take (support/attention.py); attention and score time both")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast dtype; auto = bf16 on GPUs that support it, fp32 otherwise")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (train) and "
                        "ppo.py's --compile (ppo); sample-compile always compiles")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pad_frac is None:
        args.pad_frac = {"attention": 0.4, "score": 0.3}.get(args.case, 0.0)
    if args.case:
        return run_case(args)

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    peak = matmul_peak(device, dtype)
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"matmul peak (4096^3, {str(dtype).removeprefix('torch.')}): {peak / 1e9:.1f} GFLOP/s\n")
    print(f"{'shape':<6} {'case':<15} {'rate':>16} {'of peak':>8} {'peak MB':>9}   settings")
    results = {}
    passed = [a for a in sys.argv[1:]]
    for shape in args.shapes:
        for case in args.cases:
            if case == "sample-hf" and importlib.util.find_spec("transformers") is None:
                print(f"{shape:<6} {case:<15} {'skipped: transformers is not installed':>16}")
                continue
            proc = subprocess.run([sys.executable, __file__, *passed, "--case", case, "--shape", shape],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{shape} {case} failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(shape, case)] = r
            frac = f"{r['flops'] / peak:.0%}" if "flops" in r else ""
            if case in ("attention", "score"):
                rate = f"{r['sdpa_ms'] / r['flex_ms']:.2f}x"
            else:
                rate = (f"{r['episodes_per_s']:.1f} episodes/s" if case in ("ppo", "rloo")
                        else f"{r['tokens_per_s']:.1f} tokens/s")
            print(f"{shape:<6} {case:<15} {rate:>16} {frac:>8} {r['peak_mb']:>9.0f}   {settings(case, shape, args)}",
                  flush=True)
            if case in ("attention", "score"):
                compile_s = r.get("compile_s", r.get("flex_compile_s"))
                print(f"{'':<22} FlexAttention {r['flex_ms']:.1f} ms, SDPA {r['sdpa_ms']:.1f} ms, padding "
                      f"{r['pad_frac']:.0%} of the positions; the first FlexAttention call compiled for "
                      f"{compile_s:.1f} s" + (f"; block mask {r['block_mask_ms']:.1f} ms (once per batch, shared by "
                                               f"the layers); largest difference {r['max_diff']:.1e}"
                                               if case == "attention" else ""))
            if case == "attention":
                print(f"{'':<22} one decoding step (a query against the {args.attn_len} cached keys): FlexAttention "
                      f"{r['decode_flex_ms']:.2f} ms + {r['decode_mask_ms']:.2f} ms for its block mask, SDPA "
                      f"{r['decode_sdpa_ms']:.2f} ms")
            if case in ("ppo", "rloo"):
                print(f"{'':<22} sampling {r['sampling_s']:.1f} s ({r['sample_batch']} at a time), scoring "
                      f"{r['scoring_s']:.1f} s, training {r['training_s']:.1f} s")
    print()
    for shape in args.shapes:
        speed = {case: r["tokens_per_s"] for (s, case), r in results.items() if s == shape and "tokens_per_s" in r}
        if "sample-cache" in speed and "sample-nocache" in speed:
            print(f"{shape}: KV cache speed-up {speed['sample-cache'] / speed['sample-nocache']:.1f}x (target >= 5x)")
        for ours in ("sample-cache", "sample-compile"):
            if ours in speed and "sample-hf" in speed:
                print(f"{shape}: {ours} against transformers' generate {speed[ours] / speed['sample-hf']:.2f}x"
                      + (" (target >= 3x on a GPU at 124m, batch 128, prompt 512)" if ours == "sample-compile"
                         else ""))
        if (shape, "train") in results:
            print(f"{shape}: training step at {results[(shape, 'train')]['flops'] / peak:.0%} of the matmul peak"
                  + (" (target >= 50% on a GPU at 124m)" if shape == "124m" else ""))
        if (shape, "ppo") in results:
            r = results[(shape, "ppo")]
            print(f"{shape}: PPO {r['episodes_per_s']:.1f} episodes/s, 1M episodes in "
                  f"{1e6 / r['episodes_per_s'] / 3600:.1f} h (target >= 100 episodes/s on a GPU at 124m)")
        if (shape, "ppo") in results and (shape, "rloo") in results:
            p, r = results[(shape, "ppo")], results[(shape, "rloo")]
            print(f"{shape}: RLOO against PPO, the same rollout settings: "
                  f"{r['episodes_per_s'] / p['episodes_per_s']:.2f}x the episodes/s, "
                  f"{r['peak_mb'] / p['peak_mb']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
