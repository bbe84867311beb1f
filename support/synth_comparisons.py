"""reward.py's synthetic comparisons, kept honest: SFT samples judged by the simulated labelers (synth.collect),
collected anew whenever what they depend on changed - the SFT weights, the collection flags, the gold rubric or the
labelers - and never reused from a run that was killed halfway. args: reward.py's flags."""
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

import synth
from data import load_split, write_jsonl
from support.checkpoint import model_from_checkpoint
from support.files import atomic_write


def reward_comparison_files(folder):
    return [Path(folder) / "synth_train.json", Path(folder) / "synth_valid.json"]


def collect_if_stale(args, enc, sft_ckpt, files, device, dtype):
    """Collect reward.py's comparisons into files when --collect asks or the ones there are stale."""
    key = collection_key(args, sft_ckpt)
    if args.collect or stale_comparisons(files[0].parent, files, key):
        collect_for_reward(args, enc, sft_ckpt, files, key, device, dtype)


def collection_key(args, sft_ckpt):
    """What synth comparisons depend on: the SFT weights that were sampled (a digest), the collection flags, and the
    gold rubric and simulated labelers that judged them (what they answer on fixed probes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sft_ckpt["model"].items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    flags = ("train_posts", "valid_posts", "samples", "labelers", "temperature", "ref_fraction", "seed", "data_dir")
    return dict(sft=digest.hexdigest(), judges=judging_fingerprint(args.labelers, args.seed),
                **{k: getattr(args, k) for k in flags})


def stale_comparisons(folder, files, key):
    """True (and says why) when the synth comparisons must be collected: missing, or collected from another sft.pt
    or with other settings - reused silently, they would train the RM on samples of a policy that is gone."""
    if not all(f.exists() for f in files):
        return True
    meta = folder / "synth_collected.json"
    old = json.loads(meta.read_text()) if meta.exists() else None
    if old != key:
        why = ("no record of the sft.pt they came from" if old is None else
               "they came from another sft.pt" if old.get("sft") != key["sft"] else
               "the gold rubric or the simulated labelers changed since" if old.get("judges") != key["judges"] else
               "they were collected with other settings: " + ", ".join(k for k in key if old.get(k) != key[k]))
        print(f"reward: collecting the comparisons in {folder} anew: {why}")
    return old != key


def collect_for_reward(args, enc, sft_ckpt, files, key, device, dtype):
    """Collect the comparisons into files. The record of what they came from (key) is removed first and written
    last: a run killed in between leaves no record, and the next run collects anew instead of trusting the files."""
    record = files[0].parent / "synth_collected.json"
    record.unlink(missing_ok=True)
    sft_model = model_from_checkpoint(sft_ckpt).to(device).eval()  # the policy whose samples are compared
    labelers = synth.make_labelers(args.labelers, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    for path, split, n, name in ((files[0], "train", args.train_posts, "train"),
                                 (files[1], "valid", args.valid_posts, "valid2")):
        posts = load_split("synth", split, args.data_dir)[:n]
        comps = synth.collect({f"sft_t{args.temperature:g}": sft_model}, posts, enc, labelers, rng,
                        samples=args.samples, temperature=args.temperature, ref_fraction=args.ref_fraction,
                        split="train" if split == "train" else name, batch=f"synth_{split}",
                        batch_size=256, device=device, dtype=dtype, generator=gen)
        write_jsonl(path, comps)
    atomic_write(record, json.dumps(key, indent=1) + "\n")
    print(f"reward: collected {args.train_posts:,} training and {args.valid_posts:,} held-out comparisons of SFT "
          f"samples (T={args.temperature:g}, {args.ref_fraction:.0%} with the reference) in {time.time() - t0:.0f}s")


def second_opinion_metrics(comparisons, n_labelers, seed):
    """reward.py's ceiling: second_opinion_agreement on those of the comparisons that its simulated labelers made,
    as labeler_agreement and its stderr; {} where none are (a person's labels, label.py, have no second opinion)."""
    labelers = synth.make_labelers(n_labelers, seed=seed)
    simulated = {x.worker for x in labelers}
    held = [c for c in comparisons if c["worker"] in simulated]
    if not held:
        return {}
    p, se = synth.second_opinion_agreement(held, labelers, random.Random(seed))
    return dict(labeler_agreement=p, labeler_agreement_stderr=se)


def judging_fingerprint(n_labelers, seed, probes=200):
    """A digest of what the gold rubric and the simulated labelers answer on fixed probes: gold totals of the
    reference, the perfect summary and each perturbation of `probes` posts, and every labeler's choices and
    confidences on pairs of them. Comparisons collected under another rubric (its weights, costs, lexicon) or other
    labelers (their noise, their confidence) give another digest, so they are not reused as if still valid."""
    digest, labelers = hashlib.sha256(), synth.make_labelers(n_labelers, seed=seed)
    for i in range(probes):
        record, rng = synth.synth_record(0, "train", i), random.Random(i)
        texts = [record["summary"], synth.perfect_summary(record)]
        texts += [synth.perturb_summary(record, kind, rng) for kind in synth.PERTURBATIONS]
        digest.update(" ".join(f"{synth.gold_score(record, t)['total']:.9f}" for t in texts).encode())
        labeler = labelers[i % len(labelers)]
        digest.update(str([labeler.compare(record, a, b) for a, b in zip(texts, texts[1:])]).encode())
    return digest.hexdigest()
