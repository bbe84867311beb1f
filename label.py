"""
Step 1 with people: a labeling page that collects comparisons of summaries from humans (the paper's section 3.1,
step 1, with the interface of its appendix C), written in the released comparison format.

    python label.py --policies out/synth/sft.pt out/synth/ppo.pt --out labels/me.json   # sample pairs, serve
    python label.py --out labels/methods.json --policies out/methods/seed0/{ppo,rloo}-beta0.05/ppo.pt \
        out/methods/seed0/dpo-beta0.1/dpo.pt       # PPO, RLOO and DPO side by side (tools/compare_methods.py)
    python label.py --task tldr --relabel data/tldr/comparisons/batch18.json --out labels/b18.json
    python label.py --out labels/me.json             # the same pairs again: everyone continues where they were
    python label.py --out labels/me.json --report    # agreement with the gold rubric and the original labelers
    python reward.py --comparisons labels/me.json --sft out/synth/sft.pt --out-dir out/me --batch-size 16

The pairs. Two summaries of one post: samples of policies (sft.pt, ppo.pt, dpo.pt checkpoints) at a temperature that
gives variety (0.7: most released samples whose policy name gives a temperature), with the reference summary as one
more "policy" (--ref-fraction), or the pairs of an existing comparisons file (--relabel: the paper's
researcher-labeler agreement, Section 3.3 and C.2). They are drawn once and kept in <out>.pairs.json, so a restarted
server shows the same ones.

The page. The post and the two summaries, left and right in an order drawn for each person; the 9-point scale of
the released data (1 = the left summary is definitely better ... 9 = the right one is; there is no 5, the released
files never hold one, a comparison must pick a side); optional 1-7 ratings of each summary on the paper's four axes
(overall, accuracy, coverage, coherence); a note on each summary. Keys 1-4 and 6-9 set the scale, Enter submits. Each
person gives a worker id and labels every pair; the page shows their progress and, on synthetic posts, how often
they agree with the gold rubric (the paper monitored its labelers the same way against its researchers).

The file. Each judgement is appended to <out> as one line in the released format (data.comparison_record), flushed
and fsynced before the page hears back, so a killed server loses nothing that was acknowledged; data.py's reader and
reward.py read it like OpenAI's files. The pairs of posts from the train split are mostly split "train" and a
--valid-fraction "valid2", so `reward.py --comparisons <out>` trains on your labels and reports its held-out
agreement with you; alone, or beside simulated comparisons.
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

import data
import synth
from model import pick_dtype
from support.checkpoint import POLICY_STAGES, CheckpointError, load_checkpoint, model_from_checkpoint, policy_name
from support.cli import SEED_MAX, fraction, nonnegative_float, number_in, pick_device, positive_int, seed_int
from support.files import append_durable, atomic_write, hold_lock
from support.label_server import RequestError, make_server

AXES = ("overall", "accuracy", "coverage", "coherence")  # the paper's Likert axes, 1-7 (Section 4.1, appendix C)
CONFIDENCE = (1, 2, 3, 4, 6, 7, 8, 9)  # the released scale: 1-4 summary 0 better (1 surest), 6-9 summary 1
MAX_NOTE = 4000
PAIR_SETTINGS = ("task", "policies", "relabel", "split", "n_pairs", "samples", "temperature", "ref_fraction",
                 "valid_fraction", "seed", "batch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the comparisons file judgements are appended to (JSON lines, the "
                   "released format); its pairs are kept beside it in <out>.pairs.json")
    p.add_argument("--report", action="store_true", help="print each worker's agreement with the gold rubric "
                   "(synth), the original labelers (--relabel) and each other, then exit")
    src = p.add_argument_group("the pairs (drawn once; a later run with the same --out reuses them)")
    src.add_argument("--task", choices=list(data.TASKS), help="whose posts: the synthetic TL;DR or Reddit TL;DR "
                     "(default: the task of the checkpoints or comparisons, or of the pairs file)")
    src.add_argument("--policies", nargs="+", help="sft.pt, ppo.pt or dpo.pt checkpoints to sample the summaries "
                     "from, side by side; each is named <file name>_t<temperature>, as the released data names its "
                     "policies (an RLOO run's ppo.pt: rloo_t<temperature>)")
    src.add_argument("--relabel", nargs="+", help="comparison files (ours or OpenAI's) whose pairs are labelled "
                     "again; the report gives the agreement with their labelers")
    src.add_argument("--data-dir", help="the task's data (default: data/synth or data/tldr)")
    src.add_argument("--split", default="train", choices=["train", "valid", "test", "transfer"],
                     help="posts to sample pairs for (train: the RM can train on the labels)")
    src.add_argument("--n-pairs", type=positive_int, default=50, help="pairs to label (one post each)")
    src.add_argument("--samples", type=positive_int, default=2, help="samples per post from each policy")
    src.add_argument("--temperature", type=nonnegative_float, default=0.7, help="sampling temperature (most "
                     "released samples whose policy name gives one say 0.7; at 0 each policy writes one summary per "
                     "post)")
    src.add_argument("--ref-fraction", type=fraction, default=0.25, help="fraction of pairs with the reference "
                     "summary (0 to 1)")
    src.add_argument("--valid-fraction", type=fraction, default=0.2, help="with --split train: this fraction of the "
                     "pairs is of valid-split posts, marked held out (valid2), so a reward model trained on the rest "
                     "is checked against you on posts no stage trained on")
    src.add_argument("--seed", type=seed_int, default=0, help=f"seed of the posts, samples, pairs and left/right "
                     f"orders (0 to {SEED_MAX})")
    srv = p.add_argument_group("the server")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but 127.0.0.1 lets other "
                     "machines in (the token still guards every judgement)")
    srv.add_argument("--port", type=number_in(int, 0, 65535), default=8765, help="port (0: any free one)")
    srv.add_argument("--batch", help="the batch name written in each judgement (default: the --out file's stem)")
    srv.add_argument("--device", default="auto", help="where to sample: auto (cuda if available), cpu, cuda, ...")
    srv.add_argument("--quiet", action="store_true", help="do not log each request")
    args = p.parse_args(argv)
    if args.policies and args.relabel:
        p.error("--policies and --relabel are two sources of pairs: give one")
    return args


# ----------------------------------------------------------------------------------------------------------------
# the pairs

def pair_key(info, texts):
    """A pair's identity, whichever side each summary is shown on: the post and the two summary texts."""
    ident = json.dumps([info.get("id"), info.get("post"), sorted(data.as_response(t) for t in texts)])
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def make_pair(info, summaries, split, originals=()):
    """summaries: two (policy, text). originals: the summaries earlier labelers chose (relabelling)."""
    texts = [data.as_response(t) for _, t in summaries]
    return dict(key=pair_key(info, texts), info=info, split=split,
                summaries=[[policy, text] for (policy, _), text in zip(summaries, texts)],
                originals=[data.as_response(t) for t in originals])


def pairs_from_policies(args):
    """Sample --samples summaries of --n-pairs posts from each policy, and pair them (data.make_pairs)."""
    device = pick_device(args.device)
    policies, enc = {}, None
    for path in args.policies:
        ckpt = load_checkpoint(path, stage=POLICY_STAGES, task=args.task)
        args.task = args.task or ckpt["task"]
        enc = enc or data.get_tokenizer(ckpt["tokenizer"])
        if ckpt["tokenizer"] != enc.name:
            raise CheckpointError(f"{path}: tokenizer {ckpt['tokenizer']}, but {args.policies[0]} uses {enc.name}")
        name = f"{policy_name(path, ckpt)}_t{args.temperature:g}"
        if name in policies:
            name = f"{Path(path).parent.name}/{name}"  # out/a/ppo.pt and out/b/ppo.pt
        policies[name] = model_from_checkpoint(ckpt).to(device).eval().requires_grad_(False)
    if args.task == "tldr" and args.split == "transfer":
        raise data.DataError("--task tldr --split transfer: CNN/DM articles, but the page shows Reddit posts")
    rng = np.random.default_rng(args.seed)
    # Held-out pairs are of posts no stage trained on (the valid split), as the paper's valid1/valid2 comparisons:
    # a reward model trained on the other pairs is then checked against the person on unseen posts.
    n_held = round(args.n_pairs * args.valid_fraction) if args.split == "train" else args.n_pairs
    posts, splits = [], []
    sources = ([("train", args.n_pairs - n_held, "train"), ("valid", n_held, "valid2")] if args.split == "train"
               else [(args.split, args.n_pairs, "valid2")])
    for split, n, name in sources:
        if n:
            pool = data.load_split(args.task, split, args.data_dir or data.TASKS[args.task]["data_dir"])
            posts += [pool[i] for i in sorted(rng.permutation(len(pool))[:n])]
            splits += [name] * (len(posts) - len(splits))
    order = rng.permutation(len(posts))  # held-out pairs spread among the others
    posts, splits = [posts[i] for i in order], [splits[i] for i in order]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    candidates = data.sample_candidates(policies, posts, enc, args.task, args.samples, args.temperature,
                                        batch_size=64, device=device, dtype=pick_dtype(device, "auto"), generator=gen)
    pairs, same = [], 0
    for split, (rec, summaries) in zip(splits, data.make_pairs(posts, candidates, rng, args.ref_fraction)):
        if data.as_response(summaries[0][1]) == data.as_response(summaries[1][1]):
            same += 1  # a sample that is word for word the reference: nothing to judge
            continue
        info = dict(id=rec["id"], post=rec["post"], title=rec["title"], subreddit=rec["subreddit"])
        pairs.append(make_pair(info, summaries, split))
    if same:
        print(f"label.py: left out {same} of {len(posts)} pairs whose two summaries are the same text")
    return pairs


def pairs_from_comparisons(args):
    """The pairs of existing comparison files, one per distinct pair, with every earlier labeler's choice."""
    pairs = {}
    for comp in data.read_comparisons(args.relabel):
        if comp["is_cnndm"]:
            continue  # the page shows Reddit posts
        is_synth = str(comp["id"]).startswith(synth.WORLD + "_")
        args.task = args.task or ("synth" if is_synth else "tldr")
        if is_synth != (args.task == "synth"):
            raise data.DataError(f"{args.relabel}: comparisons of {'synthetic' if is_synth else 'Reddit'} posts, "
                                 f"but --task {args.task}")
        info = dict(id=comp["id"], post=comp["post"], title=comp["title"], subreddit=comp["subreddit"])
        pair = make_pair(info, list(zip(comp["policies"], comp["summaries"])), comp["split"])
        pairs.setdefault(pair["key"], pair)["originals"].append(comp["summaries"][comp["choice"]])
    pairs = list(pairs.values())
    if not pairs:
        raise data.DataError(f"{args.relabel}: no comparisons of Reddit posts to relabel")
    order = np.random.default_rng(args.seed).permutation(len(pairs))[:args.n_pairs]
    return [pairs[i] for i in sorted(order)]


def load_or_make_pairs(args):
    """The pairs of this --out: read from <out>.pairs.json when it exists, else drawn now and written there before
    anything is served. An existing file's settings (seed, batch, ...) are restored; given a source of pairs, a flag
    that would draw other pairs is an error naming it."""
    path = Path(str(args.out) + ".pairs.json")
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            settings, pairs = saved["settings"], saved["pairs"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise data.DataError(f"{path}: not a pairs file written by label.py ({type(e).__name__}: {e}); move it "
                                 "away to draw new pairs") from None
        if args.policies or args.relabel:
            args.task, args.batch = args.task or settings["task"], args.batch or Path(args.out).stem
            changed = [k for k in PAIR_SETTINGS if getattr(args, k) != settings.get(k)]
        else:
            changed = [k for k in ("task", "batch") if getattr(args, k) not in (None, settings.get(k))]
        if changed:
            raise SystemExit("label.py: error: " + "; ".join(f"--{k.replace('_', '-')} {getattr(args, k)} but {path} "
                             f"was drawn with {settings.get(k)}" for k in changed)
                             + ". Label these pairs with the same flags (or none), or choose another --out")
        for k in PAIR_SETTINGS:
            setattr(args, k, settings.get(k, getattr(args, k)))
        args.batch = args.batch or Path(args.out).stem
        return pairs
    if not (args.policies or args.relabel):
        raise SystemExit(f"label.py: error: {path} does not exist yet: give --policies or --relabel to draw pairs")
    args.batch = args.batch or Path(args.out).stem
    pairs = pairs_from_policies(args) if args.policies else pairs_from_comparisons(args)
    atomic_write(path, json.dumps(dict(settings={k: getattr(args, k) for k in PAIR_SETTINGS}, pairs=pairs)) + "\n")
    print(f"label.py: drew {len(pairs)} pairs into {path}")
    return pairs


def gold_choice(pair):
    """The synthetic gold rubric's choice between the pair's summaries (0/1), None on a tie or a Reddit post."""
    if not str(pair["info"]["id"]).startswith(synth.WORLD + "_"):
        return None
    g0, g1 = (synth.gold_score(pair["info"], text)["total"] for _, text in pair["summaries"])
    return None if abs(g0 - g1) < 1e-9 else int(g1 > g0)


def shown_order(pair, worker, seed):
    """Which summary this worker sees on the left: a coin per (pair, worker), the same after a restart, so a
    position bias does not favor any policy."""
    digest = hashlib.sha256(f"{seed}/{pair['key']}/{worker}".encode()).digest()
    return (1, 0) if digest[0] & 1 else (0, 1)


# ----------------------------------------------------------------------------------------------------------------
# the judgements: validated, appended at once, tallied

def clean_judgement(body):
    """The confidence, axes and notes of a posted judgement, or RequestError(400) naming the bad field."""
    confidence = body.get("confidence")
    if not isinstance(confidence, int) or isinstance(confidence, bool) or confidence not in CONFIDENCE:
        raise RequestError(400, f"confidence should be one of {CONFIDENCE} (no 5: pick a side), got {confidence!r}")
    axes, notes = body.get("axes") or [{}, {}], body.get("notes") or [None, None]
    if not (isinstance(axes, list) and len(axes) == 2 and all(isinstance(a, dict) for a in axes)):
        raise RequestError(400, "axes should be a list of two objects, one per summary as shown")
    for given in axes:
        for name, value in given.items():
            if name not in AXES:
                raise RequestError(400, f"unknown axis {name!r}; the axes are {', '.join(AXES)}")
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 7:
                raise RequestError(400, f"axis {name} should be a whole number from 1 to 7, got {value!r}")
    if not (isinstance(notes, list) and len(notes) == 2 and all(n is None or isinstance(n, str) for n in notes)):
        raise RequestError(400, "notes should be a list of two strings (or nulls), one per summary as shown")
    if any(n and len(n) > MAX_NOTE for n in notes):
        raise RequestError(400, f"a note is longer than {MAX_NOTE} characters")
    return confidence, axes, [(n.strip() or None) if n else None for n in notes]


class Labels:
    """The labeling app: the pairs, who has labelled what, and the comparisons file. state() and judge() are what the
    HTTP API calls (support/label_server.py); a lock makes each judgement's check-and-append atomic."""

    def __init__(self, out, pairs, batch, seed, serving=False):
        self.out, self.pairs, self.batch, self.seed = Path(out), pairs, batch, seed
        self.by_key = {p["key"]: p for p in pairs}
        self.chosen = defaultdict(dict)  # pair key -> {worker: the summary text they chose}
        self.tally = defaultdict(Counter)  # worker -> gold_agree/gold_n/orig_agree/orig_n
        self.lock = threading.Lock()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for comp in read_labels(self.out, repair=serving):
            key = pair_key(comp, comp["summaries"])
            if key in self.by_key:
                self._count(comp["worker"], self.by_key[key], comp["summaries"][comp["choice"]])

    def _count(self, worker, pair, chosen):
        self.chosen[pair["key"]][worker] = chosen
        gold = gold_choice(pair)
        if gold is not None:
            self.tally[worker]["gold_n"] += 1
            self.tally[worker]["gold_agree"] += chosen == pair["summaries"][gold][1]
        for original in pair["originals"]:
            self.tally[worker]["orig_n"] += 1
            self.tally[worker]["orig_agree"] += chosen == original

    def state(self, worker):
        """Progress, agreement so far and the next pair (summaries in this worker's order; no policy names, no
        gold) for a worker; pair is None when they have labelled every one."""
        worker = check_worker(worker)
        with self.lock:
            done = [worker in self.chosen.get(p["key"], ()) for p in self.pairs]
            todo = next((p for p, d in zip(self.pairs, done) if not d), None)
            t = self.tally.get(worker, Counter())
            reply = dict(worker=worker, done=sum(done), total=len(self.pairs), pair=None,
                         gold=dict(agree=t["gold_agree"], n=t["gold_n"]),
                         original=dict(agree=t["orig_agree"], n=t["orig_n"]))
        if todo:
            info = todo["info"]
            reply["pair"] = dict(key=todo["key"], title=info["title"], subreddit=info["subreddit"], post=info["post"],
                                 summaries=[todo["summaries"][i][1] for i in shown_order(todo, worker, self.seed)])
        return reply

    def judge(self, body):
        """Check a posted judgement, append it as one comparison line (synced), and return the worker's new state.
        Nothing is written for a bad or repeated one."""
        worker = check_worker(body.get("worker"))
        pair = self.by_key.get(body.get("pair")) if isinstance(body.get("pair"), str) else None
        if pair is None:
            raise RequestError(404, f"no pair {body.get('pair')!r} in this session")
        confidence, axes, notes = clean_judgement(body)
        order = shown_order(pair, worker, self.seed)
        shown = [pair["summaries"][i] for i in order]  # the file keeps the order the person saw
        choice = 0 if confidence < 5 else 1
        record = data.comparison_record(pair["info"], shown, choice, worker, pair["split"], self.batch, confidence,
                                        notes, axes)
        with self.lock:
            if worker in self.chosen.get(pair["key"], ()):
                raise RequestError(409, f"{worker} has already labelled this pair (another tab?); it is kept once")
            append_durable(self.out, json.dumps(record) + "\n")
            self._count(worker, pair, shown[choice][1])
        return self.state(worker)


def check_worker(worker):
    if not isinstance(worker, str) or not 1 <= len(worker) <= 64 or not all(c.isalnum() or c in "-_." for c in worker):
        raise RequestError(400, f"worker id {worker!r}: use 1-64 letters, digits, '-', '_' or '.'")
    return worker


def read_labels(path, repair):
    """The judgements in a labels file (data.read_comparisons). A power cut during an append can leave a last line
    without its newline. repair (the server, which alone writes the file): a whole JSON object gets its newline; a
    torn line (never acknowledged) is moved to <out>.torn, saying so. Without repair (--report): it is left out."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return data.read_comparisons(path)
    cut = raw.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(raw[cut:]), dict)
    except ValueError:
        whole = False
    if not repair:
        print(f"label.py: {path}: its last line has no newline; left out here", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / path.name).write_bytes(raw[:cut])
            return data.read_comparisons(Path(tmp) / path.name)
    if whole:
        append_durable(path, "\n")
        print(f"label.py: {path}: added the newline its last line lacked", file=sys.stderr)
    else:
        torn = Path(str(path) + ".torn")
        with open(torn, "ab") as f:
            f.write(raw[cut:] + b"\n")
        with open(path, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
        print(f"label.py: {path}: its last line was cut short (never acknowledged); moved to {torn}", file=sys.stderr)
    return data.read_comparisons(path)


def lock_labels(path):
    """One server per labels file: a second one would append beside the first, and neither would see the other's
    judgements (the check against labelling a pair twice lives in each server's memory). A context manager."""
    return hold_lock(str(path) + ".lock", f"label.py: error: another label.py (pid {{pid}}) is serving {path} (it "
                     f"holds {path}.lock); stop it, or let everyone use its address")


# ----------------------------------------------------------------------------------------------------------------
# the report: how each person agrees with the gold rubric, the original labelers and each other

def rate(agree, n):
    """p +- one standard error (agree/n). At 0% or 100% that error is 0 and says nothing: the rule of three gives a
    95% bound instead."""
    if not n:
        return "-"
    p = agree / n
    if 0 < agree < n:
        return f"{p:.1%} +- {math.sqrt(p * (1 - p) / n):.1%} ({agree}/{n})"
    if n < 3:
        return f"{p:.0%} ({agree}/{n})"
    side, bound = ("at least", 1 - 3 / n) if agree else ("at most", 3 / n)
    return f"{p:.0%} ({agree}/{n}; 95% bound: {side} {bound:.0%})"


def gold_reason(pair, chosen_gold):
    """The rubric axis that weighed most for the gold choice (weights as in gold_score's total)."""
    scores = [synth.gold_score(pair["info"], text) for _, text in pair["summaries"]]
    weights = synth.AXIS_WEIGHTS
    return max(weights, key=lambda k: weights[k] * (scores[chosen_gold][k] - scores[1 - chosen_gold][k]))


def report(labels, out=None):
    """Per worker: judgements, agreement with the gold rubric (synth) and the original labelers (relabel), with one
    standard error; where they part from the gold rubric, the axis that decided gold's choice; and the agreement
    between people on pairs both labelled."""
    out = out or sys.stdout
    labelled, parted = Counter(), defaultdict(Counter)
    for pair in labels.pairs:
        gold = gold_choice(pair)
        for worker, chosen in labels.chosen.get(pair["key"], {}).items():
            labelled[worker] += 1
            if gold is not None:
                parted[worker][(gold_reason(pair, gold), chosen == pair["summaries"][gold][1])] += 1
    print(f"{labels.out}: {sum(labelled.values())} judgements of {len(labels.pairs)} pairs", file=out)
    for worker in sorted(labelled):
        t = labels.tally[worker]
        print(f"  {worker}: {labelled[worker]} labelled | agrees with the gold rubric "
              f"{rate(t['gold_agree'], t['gold_n'])} | with the original labelers {rate(t['orig_agree'], t['orig_n'])}",
              file=out)
        for axis in ("coverage", "accuracy", "coherence", "length"):
            agree, n = parted[worker][(axis, True)], parted[worker][(axis, True)] + parted[worker][(axis, False)]
            if n:
                print(f"    where gold decided on {axis:9s}: agrees {rate(agree, n)}", file=out)
    same = [a == b for chosen in labels.chosen.values() for a, b in itertools.combinations(chosen.values(), 2)]
    if same:
        print(f"  between people, on pairs labelled by two or more: {rate(sum(same), len(same))}", file=out)
    print("  (the paper: labelers agreed with researchers 77% +- 2%, researchers with each other 73% +- 4%; the "
          "synthetic labelers are calibrated to ~75%)", file=out)


def main(argv=None):
    args = parse_args(argv)
    pairs = load_or_make_pairs(args)
    if args.report:
        return report(Labels(args.out, pairs, args.batch, args.seed))
    with lock_labels(args.out):
        labels = Labels(args.out, pairs, args.batch, args.seed, serving=True)
        try:
            server = make_server(labels, args.host, args.port, quiet=args.quiet)
        except OSError as e:
            raise OSError(f"cannot listen on --host {args.host} --port {args.port}: {e.strerror or e}") from None
        print(f"label.py: {len(pairs)} pairs, judgements appended to {args.out}\n"
              f"label.py: open {server.url}\n(Ctrl-C stops; every judgement is already on disk)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("label.py: stopped")
        finally:
            server.server_close()


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, CheckpointError, ValueError, OSError) as e:
        sys.exit(f"label.py: error: {e}")
