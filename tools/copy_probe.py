"""
Has a synth policy learned to copy facts from the post? For validation posts, teacher-force the start of a summary
and read the probability of the right next token:
  name      after "My <relation>", the other person's name (present in a tenth of the references)
  duration  after "My <relation> of", the number of the duration
  tried     after "My <relation> <problem>. I", the first word of what the poster tried

A model that rarely writes a name gives the right one a small probability even if it would copy it, so each probe
also reads the right token's share among the tokens of its kind (the 24 names, the numbers 2-11, the first words of
the attempts): chance there is 1/24, 1/10 and 1/5, and a model that knows only the other person's gender gets 1/12.

    python tools/copy_probe.py out/synth/sft.pt            # mean probability, its share, how often it is the argmax
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import synth  # noqa: E402
from support.checkpoint import POLICY_STAGES, load_checkpoint, model_from_checkpoint  # noqa: E402

PROBES = {
    "name": lambda f: (f" My {f['rel']}", f" {f['name']}"),
    "duration": lambda f: (f" My {f['rel']} of", " " + f["dur"].split()[0]),
    "tried": lambda f: (f" My {f['rel']} {f['vp']}. I", " " + f["tried"].split()[0]),
}
KINDS = {  # every word a probe's answer can be: the right one's share among them is the copying itself
    "name": [n for names in synth.NAMES.values() for n in names],
    "duration": [str(n) for n in range(2, 12)],
    "tried": sorted({t.split()[0] for t in synth.TRIED}),
}


@torch.no_grad()
def probe(model, enc, records, make, kind):
    """Mean probability of the right next token, its mean share of the probability of the tokens of its kind, and
    the fraction of posts where it is the most likely token."""
    candidates = [enc.encode_ordinary(" " + w)[0] for w in kind]
    prob, share, top = [], [], []
    for record in records:
        prefix, target = make(synth._facts(record))
        tokens = enc.encode_ordinary(data.format_query(record, enc, data.TASKS["synth"]["query_len"]) + prefix)
        p = torch.softmax(model(torch.tensor([tokens]))[0, -1].float(), -1)
        right = enc.encode_ordinary(target)[0]
        prob.append(float(p[right]))
        share.append(float(p[right] / p[candidates].sum()))
        top.append(int(p.argmax()) == right)
    n = len(records)
    return sum(prob) / n, sum(share) / n, sum(top) / n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an sft.pt or ppo.pt of the synthetic task")
    p.add_argument("--posts", type=int, default=300, help="validation posts")
    args = p.parse_args()
    model = model_from_checkpoint(load_checkpoint(args.checkpoint, stage=POLICY_STAGES, task="synth")).eval()
    enc = data.get_tokenizer(data.SYNTH_TOKENIZER)
    records = [synth.synth_record(0, "valid", i) for i in range(args.posts)]
    for name, make in PROBES.items():
        prob, share, top = probe(model, enc, records, make, KINDS[name])
        print(f"{name:<9} P(right token) {prob:.3f} | its share among the {len(KINDS[name])} of its kind {share:.3f} "
              f"(chance {1 / len(KINDS[name]):.3f}) | the most likely token {100 * top:.0f}% of the time")


if __name__ == "__main__":
    main()
