"""
The README's reading map: the RLHF core as file:line ranges in reading order, each with what it teaches. The ranges
are found by name (functions and classes), so they follow the code as it moves; tests/test_reading_map.py fails when
the README's copy of this table is out of date.

    python tools/reading_map.py            # prints the table the README holds, and the length of the whole path
    python tools/reading_map.py --write    # puts it in README.md, between its reading-map markers
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (file, the definitions to read, what they teach, the paper). In order: nothing is used before it is introduced.
CORE = [
    ("model.py", ["GPTConfig", "visible", "CausalSelfAttention", "MLP", "Block", "KVCache", "GPT"], "one GPT-2 in "
     "four roles (policy, reference, reward model, value network): the attention mask as code (no future, no left "
     "padding), positions counted from each row's first real token, `generate` with a KV cache", "3.4, Models"),
    ("model.py", ["response_logprobs", "reward_at_eos", "last_token_index", "sample_token"], "what PPO's ratio and "
     "KL are made of (log-probs at the sampling temperature), the reward read at the summary's EOS, pure sampling",
     "3.4"),
    ("data.py", ["format_query"], "the query, and its post cut at a newline until it fits", "3.2"),
    ("data.py", ["_encode_responses"], "the response: \" \" + summary, then the EOS its reward is read at", "3.2"),
    ("sft.py", ["sft_loss"], "the supervised baseline: cross-entropy on the summary tokens", "3.4, Supervised "
     "baselines"),
    ("reward.py", ["pair_rewards", "preference_loss"], "the reward model's loss -log sigmoid(r(preferred) - "
     "r(other))", "3.4, Reward models"),
    ("reward.py", ["normalize"], "the bias that makes the reference summaries score 0", "3.4"),
    ("ppo.py", ["masked_mean", "masked_whiten", "shape_rewards", "gae", "rloo_advantages", "policy_loss",
                "value_loss", "AdaptiveKL"], "the RLHF math as small pure functions: the KL penalty in the reward, "
     "GAE (or RLOO's leave-one-out baseline), the clipped losses", "3.4, appendix B"),
    ("ppo.py", ["episode_tokens", "value_estimates", "rollout", "estimate_advantages", "add_advantages",
                "minibatches", "ppo_losses", "ppo_update"], "one update: sample and score, advantages (the one "
     "place another estimate goes), 4 epochs of clipped steps", "3.4, Human feedback policies"),
    ("ppo.py", ["run"], "the loop: sample, score, advantages, update, log, save", "3.4"),
    ("evaluate.py", ["bon_kl", "length_controlled"], "best-of-N's KL, and preference at equal length", "4, "
     "appendix F"),
]


# The files a student opens, in reading order (support/ and tools/ are plumbing).
PATH = ["model.py", "data.py", "sft.py", "reward.py", "ppo.py", "evaluate.py", "synth.py"]


def line_range(path, names):
    """The first and last line of the named top-level definitions of path (decorators included), which must stand
    together: nothing else between them."""
    tree = ast.parse(path.read_text())
    found = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"reading_map.py: {path.name} has no {', '.join(missing)}: update CORE")
    nodes = sorted((found[n] for n in names), key=lambda n: n.lineno)
    top = [n for n in tree.body if nodes[0].lineno <= n.lineno <= nodes[-1].lineno
           and isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    if len(top) != len(nodes):
        others = sorted({n.name for n in top} - set(names))
        raise SystemExit(f"reading_map.py: {path.name}: {', '.join(others)} stand among {names}: update CORE")
    return min([nodes[0].lineno] + [d.lineno for d in nodes[0].decorator_list]), nodes[-1].end_lineno


def table():
    rows, total = ["| | lines | what it teaches | the paper |", "|---|---|---|---|"], 0
    for i, (file, names, what, paper) in enumerate(CORE, 1):
        start, end = line_range(ROOT / file, names)
        total += end - start + 1
        rows.append(f"| {i} | `{file}:{start}-{end}` | {what} | {paper} |")
    whole = sum(len((ROOT / f).read_text().splitlines()) for f in PATH)
    return "\n".join(rows) + f"\n\n{total} lines in all, in a reading path of {len(PATH)} files and {whole:,} lines.\n"


def write_readme():
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:start] + table() + text[end:])


START, END = "<!-- reading map -->\n", "<!-- /reading map -->"

if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme()
    else:
        print(table(), end="")
