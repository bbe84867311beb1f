"""
Stage 1: supervised fine-tuning on the reference summaries (the paper's "supervised baseline", section 3.4).

The resulting policy samples the first summaries to compare, initializes the PPO policy, the reference policy of the
KL penalty and the reward model, and is the baseline every result is compared to.

    python sft.py --task synth                  # the synthetic TL;DR: a small GPT from scratch (--model synth-s)
    python sft.py --task tldr --model gpt2      # Reddit TL;DR from GPT-2 weights (any size, or a local HF dir)

Writes <out>/sft.pt (the policy), <out>/sft.json (final metrics), <out>/sft.log.jsonl (one line per step) and
<out>/sft_samples.jsonl (temperature-0 summaries of validation posts). The loss is on the summary tokens only
(" " + summary + EOS), as in the paper; --loss-on all also trains on the query.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import synth  # the synthetic task's world: its tokenizer's words, its data (made on first use), the gold rubric
from model import SYNTH_SIZES, GPT, GPTConfig, autocast, pick_dtype, sample_responses, trim_padding
from support import distributed, hf
from support.checkpoint import (CheckpointError, check_finite, input_digests, load_checkpoint, load_resume_state,
                                model_from_checkpoint, save_final, save_or_stop, stop_if_not_finite)
from support.cli import (add_run_args, add_task_args, fill_task_defaults, nonnegative_float, positive_float,
                         positive_int, warmup_fraction)
from support.files import run_lock
from support.optim import configure_optimizers, cosine_lr, optimizer_step, paper_lr
from support.steplog import StepLog

# Task defaults; a flag left at None takes its value from here. tldr follows the paper (batch 128, one epoch,
# cosine decay, learning rate by model size); synth is sized so the whole stage takes minutes on a 2-core CPU.
DEFAULTS = {
    "tldr": dict(model="gpt2", batch_size=128, micro_batch_size=8, lr=None, warmup=0.0, epochs=1.0, eval_every=100,
                 save_every=200, val_size=1024, sample_n=256),
    "synth": dict(model="synth-s", batch_size=64, micro_batch_size=None, lr=6e-3, warmup=0.05, epochs=2.0,
                  eval_every=50, save_every=50, val_size=512, sample_n=500),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p, "sft")
    # model
    p.add_argument("--model", help="tldr: a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face "
                   "directory, or an sft.pt to continue from; synth: a size built from scratch, "
                   + ", ".join(f"{k} ({v['n_layer']}x{v['n_embd']})" for k, v in SYNTH_SIZES.items())
                   + " (layers x width; default synth-s), or an sft.pt")
    p.add_argument("--n-layer", type=positive_int, help="layers of a model built from scratch (default: its size's)")
    p.add_argument("--n-head", type=positive_int, help="attention heads of a model built from scratch (default: its "
                   "size's)")
    p.add_argument("--n-embd", type=positive_int, help="width of a model built from scratch (default: its size's)")
    # optimization
    p.add_argument("--batch-size", type=positive_int,
                   help="examples per optimizer step, over all processes under torchrun "
                   "(tldr 128, the paper's; synth 64)")
    p.add_argument("--micro-batch-size", type=positive_int,
                   help="examples per forward/backward in each process; gradients "
                   "accumulate over batch-size / (micro-batch-size x processes) of them (lower it to fit memory)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate. tldr default: the paper's SFT rates "
                   "(6.35e-5 at 1.3B, 2.83e-5 at 6.7B) extrapolated by their power law to the model size (2.0e-4 "
                   "for 124M, 5.9e-5 for 1.5B); synth: 6e-3, high for a from-scratch model that must learn within 2 "
                   "epochs to copy facts from the post (at 2e-3 the earlier world's model never copied a number)")
    p.add_argument("--warmup", type=warmup_fraction, help="fraction of the steps with a linear warm-up, at least 0 and "
                   "less than 1 (tldr 0, synth 0.05); then cosine decay to 0")
    p.add_argument("--epochs", type=positive_float, help="passes over the training posts, a fraction allowed (tldr: 1, "
                   "the paper's; synth: 2)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay on 2-D weights")
    p.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--loss-on", choices=["summary", "all"], default="summary", help="summary: loss on the summary "
                   "tokens and EOS (the paper); all: on the query's tokens too")
    # evaluation and logging
    p.add_argument("--eval-every", type=positive_int, help="steps between validation losses")
    p.add_argument("--val-size", type=positive_int, help="validation posts for the validation loss")
    p.add_argument("--sample-n", type=positive_int, help="validation posts summarized at temperature 0 at the end "
                   "(ROUGE, length, and for synth the gold preference over the references)")
    p.add_argument("--save-every", type=positive_int, help="steps between resumable checkpoints (<out>/sft.resume.pt)")
    add_run_args(p, "sft")
    args = p.parse_args(argv)
    fill_task_defaults(args, DEFAULTS)
    if args.model in SYNTH_SIZES:
        shape = {k: getattr(args, k) or v for k, v in SYNTH_SIZES[args.model].items()}  # a flag overrides its size's
        if shape["n_embd"] % shape["n_head"]:  # the model's attention splits the width into equal heads
            p.error(f"--n-embd {shape['n_embd']} is not a multiple of --n-head {shape['n_head']}")
        vars(args).update(shape)
    # synth: each process's share of the batch in one pass
    args.micro_batch_size = args.micro_batch_size or max(1, args.batch_size // distributed.world_size())
    distributed.check_batch(p, "batch-size", args.batch_size, "micro-batch-size", args.micro_batch_size)
    return args


def build_model(args, enc, block_size):
    """The starting policy: GPT-2 weights, a previous sft.pt, or (synth) a small GPT from scratch."""
    if args.model in SYNTH_SIZES:  # its shape is in args.n_layer, n_head and n_embd (parse_args)
        return GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=block_size, n_layer=args.n_layer, n_head=args.n_head,
                             n_embd=args.n_embd))
    if args.model.endswith(".pt"):
        return model_from_checkpoint(load_checkpoint(args.model, stage="sft", tokenizer=enc.name))
    model = hf.from_pretrained(args.model)
    if model.config.vocab_size != enc.n_vocab:
        raise ValueError(f"--model {args.model} has {model.config.vocab_size} tokens, the {enc.name} tokenizer "
                         f"{enc.n_vocab}")
    return model


def sft_loss(model, query, response, pad, loss_on):
    """Summed cross-entropy and the number of target tokens of a batch of (B, Lq) left-padded queries and (B, Lr)
    right-padded responses. Summing (not averaging) lets micro-batches add up to the exact mean over the batch."""
    tokens, cut = trim_padding(torch.cat([query, response], 1), pad)
    n_query = query.size(1) - cut
    mask = tokens != pad
    start = 0 if loss_on == "all" else n_query - 1  # position t predicts token t + 1
    logits = model(tokens, mask.long(), head_from=start)[:, :-1]
    targets = tokens[:, start + 1:]
    # A target counts when it is a real token with a real token before it (the first query token has none).
    weight = (mask[:, start + 1:] & mask[:, start:-1]).float()
    targets = targets.masked_fill(weight == 0, 0)  # PAD is no class of the (cut) logits; weight 0 drops it anyway
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (loss * weight.reshape(-1)).sum(), weight.sum()


@torch.no_grad()
def validation_loss(model, val, args, pad, device, dtype):
    """The mean loss per summary token over val; under torchrun each process takes its shard and the sums add up."""
    model.eval()
    total, count = 0.0, 0.0
    rows = range(len(val["query"]))[distributed.shard(len(val["query"]))]
    for i in range(rows.start, rows.stop, args.micro_batch_size):
        q, r = data.tensors(val, slice(i, min(i + args.micro_batch_size, rows.stop)), ("query", "response"), device)
        with autocast(device, dtype):
            loss, n = sft_loss(model, q, r, pad, "summary")
        total, count = total + loss.item(), count + n.item()
    model.train()
    total, count = distributed.sum_over_ranks([total, count])
    return total / count


def load_data(args, enc):
    """Tokenized training and validation posts (rank 0 writes the files and caches first; the others read them)."""
    task = data.TASKS[args.task]
    with distributed.main_first():
        if args.task == "synth" and not (Path(args.data_dir) / task["files"]["train"]).exists():
            synth.write_synth(args.data_dir, seed=0)  # the synthetic task is generated on first use, in seconds
        train_records = data.load_split(args.task, "train", args.data_dir)
        valid_records = data.load_split(args.task, "valid", args.data_dir)
        train = data.prepare_sft(train_records, enc, task["query_len"], task["response_len"], args.cache_dir)
        valid = data.prepare_sft(valid_records, enc, task["query_len"], task["response_len"], args.cache_dir)
    return train, valid, valid_records


def train_step(train_forward, train, idx, args, pad, device, dtype):
    """Forward and backward of one global batch (the rows idx), in micro-batches whose gradients add up to the mean
    over the batch's target tokens. Returns the batch's mean loss and its number of tokens."""
    world = distributed.world_size()
    accum = args.batch_size // (args.micro_batch_size * world)  # micro-batches per process and step
    # The global batch's target count, so micro-batch losses add up to the exact mean. Query and response are one
    # contiguous run of real tokens per row: with --loss-on all every real token but the first is a target.
    n_target = float((train["response"][idx] != pad).sum())
    if args.loss_on == "all":
        n_target += float((train["query"][idx] != pad).sum()) - len(idx)
    mine = idx[distributed.shard(len(idx))]  # this process's rows of the global batch
    loss_sum, tokens = 0.0, 0
    for m in range(accum):
        part = mine[m * args.micro_batch_size:(m + 1) * args.micro_batch_size]
        q, r = data.tensors(train, part, ("query", "response"), device)
        with distributed.no_sync(train_forward, skip=m < accum - 1), autocast(device, dtype):
            loss, n = sft_loss(train_forward, q, r, pad, args.loss_on)
        # DDP averages gradients over the processes; times their number, the average is the batch's sum.
        (loss * world / n_target).backward()
        loss_sum += loss.item()
        tokens += int((q != pad).sum() + (r != pad).sum())
    loss_sum, tokens = distributed.sum_over_ranks([loss_sum, tokens])
    return loss_sum / n_target, tokens


def summarize_validation(model, valid, valid_records, args, enc, device, dtype):
    """Temperature-0 summaries of the first --sample-n validation posts, each process summarizing its shard; every
    process gets them all. Returns the posts, their prepared arrays and the summaries' tokens."""
    model.eval()
    sample = {k: v[:args.sample_n] for k, v in valid.items()}
    records = [valid_records[i] for i in sample["index"]]
    mine = sample["query"][distributed.shard(len(sample["query"]))]
    responses = sample_responses(model, mine, data.TASKS[args.task]["response_len"], 0.0, enc.eot_token,
                                 data.pad_id(enc), args.micro_batch_size, device, dtype,
                                 desc="sft: summarizing validation posts" if distributed.is_main() else None)
    return records, sample, distributed.gather(responses)


def finish(model, last, records, sample, responses, args, enc, out, step, t_start):
    """ROUGE, length and (synth) the gold preference of the final summaries; sft.pt, sft.json, sft_samples.jsonl."""
    pad, eos = data.pad_id(enc), enc.eot_token
    texts = data.decode_responses(enc, responses)
    lengths = (responses != pad).sum(1) - (responses == eos).sum(1)  # tokens before EOS
    metrics = dict(val_loss=last["val_loss"], train_loss=last["loss"], steps=step, examples=step * args.batch_size,
                   minutes=(time.time() - t_start) / 60, sample_n=len(texts), mean_length=float(lengths.float().mean()),
                   ref_mean_length=float(((sample["response"] != pad).sum(1) - 1).mean()),
                   **data.mean_rouge(texts, [r["summary"] for r in records]))
    if args.task == "synth":
        metrics["gold_win_rate_vs_ref"] = synth.gold_win_rate(records, texts)
        metrics["gold_win_rate_stderr"] = math.sqrt(metrics["gold_win_rate_vs_ref"] *
                                                    (1 - metrics["gold_win_rate_vs_ref"]) / len(texts))
    check_finite(out / "sft.pt", model=model.state_dict(), metrics=metrics)  # before any final file
    with open(out / "sft_samples.jsonl", "w") as f:
        for rec, text in zip(records, texts):
            f.write(json.dumps(dict(id=rec["id"], reference=data.as_response(rec["summary"]), sft=text)) + "\n")
    for rec, text in list(zip(records, texts))[:3]:
        print(f"\n  reference:{data.as_response(rec['summary'])}\n  sft:      {text}")
    save_final(out, model, stage="sft", task=args.task, tokenizer=enc.name, args=args, step=step, metrics=metrics)
    print("\nsft: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    print(f"sft: wrote {out / 'sft.pt'}")


def main(argv=None):
    args = parse_args(argv)
    with run_lock(args.out_dir, "sft"):  # one run per out-dir: a second would mix its files with this one's
        run(args)


def run(args):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = distributed.setup(args.device)  # the process group too, under torchrun
    dtype = pick_dtype(device, args.dtype)
    task = data.TASKS[args.task]
    enc = data.get_tokenizer(task["tokenizer"])
    pad, Lq, Lr = data.pad_id(enc), task["query_len"], task["response_len"]

    train, valid, valid_records = load_data(args, enc)
    # what a resume must find unchanged: the starting weights and the posts
    files = {f"--data-dir {split}": data.split_path(args.task, split, args.data_dir) for split in ("train", "valid")}
    inputs = input_digests({"--model": args.model, **files})
    val = {k: v[:args.val_size] for k, v in valid.items()}
    n_train = len(train["query"])
    total_steps = int(args.epochs * n_train) // args.batch_size
    if total_steps < 1:
        raise ValueError(f"{n_train} training examples make no step of --batch-size {args.batch_size}")

    model = build_model(args, enc, Lq + task["rm_response_len"]).to(device)  # room for the RM's longer responses
    if Lq + Lr > model.config.block_size:
        raise ValueError(f"queries of {Lq} + responses of {Lr} tokens exceed the model's {model.config.block_size}")
    if args.lr is None:  # tldr: by model size (0 is refused by --lr's type, never read as unset)
        args.lr = paper_lr("sft", model.num_params())
    optimizer = configure_optimizers(model, args.lr, args.weight_decay, device_type=device.type)
    step = (load_resume_state(out / "sft.resume.pt", model, optimizer, "sft", args, inputs)["step"]
            if args.resume else 0)
    forward = torch.compile(model) if args.compile else model
    train_forward = distributed.wrap(forward, device)  # DDP under torchrun: gradients averaged in backward()
    world = distributed.world_size()
    print(f"sft: {args.task}, {model.num_params():,} parameters, {n_train:,} examples, {total_steps} steps of "
          f"{args.batch_size} ({args.batch_size // (args.micro_batch_size * world)} x {args.micro_batch_size}"
          + (f" x {world} processes" if world > 1 else "") + f"), lr {args.lr:.2e}, {device} {dtype}")

    log = StepLog(out / "sft.log.jsonl", resume_step=step if args.resume else None)
    t_start = time.time()
    if step == 0:  # where the validation loss starts, for comparison
        row = dict(step=0, val_loss=validation_loss(forward, val, args, pad, device, dtype), elapsed=0.0)
        log.write(row)
        print(f"step 0/{total_steps} | val loss {row['val_loss']:.4f}")
    model.train()
    while step < total_steps:
        t0 = time.time()
        lr = cosine_lr(step, total_steps, args.lr, args.warmup)
        idx = data.batch_indices(n_train, args.batch_size, step, args.seed)
        loss, tokens = train_step(train_forward, train, idx, args, pad, device, dtype)
        stop_if_not_finite(loss, f"step {step + 1}", out / "sft.resume.pt")
        optimizer_step(optimizer, model.parameters(), lr, args.grad_clip)
        step += 1
        row = dict(step=step, loss=loss, lr=lr, tokens_per_s=tokens / (time.time() - t0),
                   elapsed=time.time() - t_start)
        if step % args.eval_every == 0 or step == total_steps:
            row["val_loss"] = validation_loss(forward, val, args, pad, device, dtype)
            check_finite(out / "sft.pt", val_loss=row["val_loss"])  # diverged after the last step's loss check
        log.write(row)
        print(f"step {step}/{total_steps} | loss {row['loss']:.4f} | lr {lr:.2e} | {row['tokens_per_s']:,.0f} tok/s"
              f" | {row['elapsed']:.1f}s" + (f" | val loss {row['val_loss']:.4f}" if "val_loss" in row else ""))
        if save_or_stop(out, model, optimizer, step, total_steps, stage="sft", args=args, task=args.task,
                        tokenizer=enc.name, inputs=inputs):
            return
    log.close()

    records, sample, responses = summarize_validation(model, valid, valid_records, args, enc, device, dtype)
    if distributed.is_main():  # the metrics and files are rank 0's
        last = [json.loads(line) for line in (out / "sft.log.jsonl").read_text().splitlines()][-1]
        finish(model, last, records, sample, responses, args, enc, out, step, t_start)


if __name__ == "__main__":
    try:
        main()
        distributed.finish()
    except (data.DataError, CheckpointError, OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"sft.py: error: {e}")
