"""Summarize one post with a trained policy: the first thing to run after training.

    python sample.py post.txt                             # a post in a text file; out/synth's ppo.pt (else sft.pt)
    echo "My sister owes me money ..." | python sample.py -                  # a post on stdin
    python sample.py --split valid --index 3 --n 4 --reward out/synth/reward.pt   # a post of a split, each scored
    python sample.py --policy out/synth/sft.pt --temperature 0 post.txt           # argmax, as evaluate.py summarizes
    python sample.py --policy DIR --title "..." post.txt  # a Hugging Face GPT-2 directory (the tldr task's query)

The query is built as every stage builds it (data.format_query: a post too long is cut at its last newline until it
fits, as OpenAI's code cuts it), the summaries are sampled as evaluate.py samples them (data.summarize), and the
reward model reads each at its EOS; a summary that never wrote an EOS gets the score PPO gave it instead
(data.score_summaries with the PPO run's --no-eos-score, -1 by default).
"""
import argparse
import sys
from pathlib import Path

import torch

import data
import synth  # noqa: F401  the synthetic world: data.get_tokenizer and the readers need it for --task synth
from model import pick_dtype
from support.checkpoint import POLICY_STAGES, CheckpointError, load_checkpoint, model_from_checkpoint
from support.cli import nonnegative_float, nonnegative_int, pick_device, positive_int, seed_int
from support.hf import from_pretrained


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the post
    p.add_argument("post", nargs="?", help="a text file holding the post, or - to read it from stdin")
    p.add_argument("--title", default="", help="the title of a post given as text (the query has a TITLE line)")
    p.add_argument("--subreddit", default="", help="the subreddit of a post given as text")
    p.add_argument("--split", choices=list(data.TASKS["synth"]["files"]), help="take the post from this split of "
                   "the policy's task instead")
    p.add_argument("--index", type=nonnegative_int, default=0, help="which post of --split, counting from 0")
    p.add_argument("--data-dir", help="the task's data (default: data/synth or data/tldr)")
    # the models
    p.add_argument("--out-dir", default="out/synth", help="where the default policy is: its ppo.pt, else its sft.pt")
    p.add_argument("--policy", help="an sft.pt or ppo.pt, or a Hugging Face GPT-2 directory (config.json and "
                   "model.safetensors; read as the tldr task)")
    p.add_argument("--reward", help="a reward.pt: print its score of each summary")
    # sampling
    p.add_argument("--n", type=positive_int, default=1, help="how many summaries to sample")
    p.add_argument("--temperature", type=nonnegative_float, default=0.7, help="0 = argmax, the summary evaluate.py "
                   "judges; the default 0.7 is the temperature PPO samples and trains at, so it shows what PPO saw")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype: auto = bf16 on GPUs that support it, fp32 otherwise")
    args = p.parse_args(argv)
    if (args.post is None) == (args.split is None):
        p.error("give one post: a text file (- for stdin), or --split with --index")
    return args


def load_policy(path):
    """(policy, task, tokenizer name, the score PPO gives a summary without EOS) of a checkpoint or an HF folder."""
    if Path(path).is_dir():
        return from_pretrained(path), "tldr", "gpt2", -1.0
    ckpt = load_checkpoint(path, stage=POLICY_STAGES)
    return model_from_checkpoint(ckpt), ckpt["task"], ckpt["tokenizer"], ckpt["args"].get("no_eos_score", -1.0)


def read_post(args, task):
    """The record to summarize: one of a split, or a text as a post (with the given title and subreddit)."""
    if args.split:
        records = data.load_split(task, args.split, args.data_dir)
        if args.index >= len(records):
            raise data.DataError(f"--index {args.index}: the {task} {args.split} split has {len(records)} posts")
        return records[args.index]
    if args.post != "-" and not Path(args.post).is_file():
        raise FileNotFoundError(f"{args.post}: no such file (give a text file holding the post, or - for stdin)")
    text = sys.stdin.read() if args.post == "-" else Path(args.post).read_text()
    if not text.strip():
        raise data.DataError(f"{'stdin' if args.post == '-' else args.post} holds no post")
    return dict(id=args.post, subreddit=args.subreddit, title=args.title, post=text.strip())


def main(argv=None):
    """Print the query and each summary (with its reward); return the texts, whether each ended, their scores."""
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    path = args.policy or next((p for p in (Path(args.out_dir) / "ppo.pt", Path(args.out_dir) / "sft.pt")
                                if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{args.out_dir} holds neither ppo.pt nor sft.pt: train one (python sft.py) or give "
                              "--policy")
    policy, task, tokenizer, no_eos_score = load_policy(path)
    policy.requires_grad_(False)  # never trained here (support/attention.py: a frozen model may take FlexAttention)
    enc = data.get_tokenizer(tokenizer)
    record = read_post(args, task)
    query_len = data.TASKS[task]["query_len"]
    query = data.format_query(record, enc, query_len)
    cut = query != data.format_query(record, enc, float("inf"))
    print(query + (f"\n(the post was cut to fit the task's {query_len}-token query)" if cut else ""))
    records = [record] * args.n
    gen = torch.Generator(device).manual_seed(args.seed)
    texts, ended = data.summarize(policy.to(device).eval(), records, enc, task, args.temperature, device=device,
                                  dtype=dtype, generator=gen, with_ended=True)
    scores = [None] * args.n
    if args.reward:
        rm = model_from_checkpoint(load_checkpoint(args.reward, stage="reward", task=task, tokenizer=enc.name))
        rm.requires_grad_(False)
        scores = data.score_summaries(rm.to(device).eval(), records, texts, enc, task, device=device, dtype=dtype,
                                      ended=ended, no_eos_score=no_eos_score)
    for i, (text, end, score) in enumerate(zip(texts, ended, scores)):
        reward = "" if score is None else f" reward {score:+.4f}"
        print(f"[{i + 1}/{args.n}]{reward}{'' if end else ' (no EOS)'} {text.strip()}")
    return texts, ended, scores


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, CheckpointError, OSError, ValueError) as e:
        sys.exit(f"sample.py: error: {e}")
