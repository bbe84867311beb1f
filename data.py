"""Data for both tasks: the paper's Reddit TL;DR (`tldr`) and an offline synthetic TL;DR (`synth`).

    python -m support.openai_data              # OpenAI's files -> data/tldr/ (resumable)
    python synth.py --seed 0                   # synthetic posts -> data/synth/ (the world, gold and labelers: synth.py)

Everything a stage consumes comes from here: the conventions of the query (`format_query`, the one place it is
built) and of the response (`as_response` + EOS), the tokenized arrays the stages train on, the decoding and scoring
of sampled summaries, and comparison collection (the paper's step 1, with any labelers). The plumbing beneath is
named here too: the readers and writers of the released file formats (support/formats.py), the tokenizers
(support/tokenizers.py) and ROUGE (support/rouge.py). synth.py makes the synthetic task's files (and hands over its
world's words and post check: `register_synthetic_world`); this module only reads them.

Layout of a task's data directory (the same for both tasks, so the stages have one code path):
    {data_dir}/train.jsonl valid.jsonl test.jsonl      posts + reference TL;DRs (tldr_3_filtered format)
    {data_dir}/comparisons/*.json                      pairwise comparisons (original JSON-lines format)
    {data_dir}/axis_evals/*.json                       Likert ratings (tldr only)
    {data_dir}/cnndm_test.jsonl | transfer.jsonl       the transfer set: CNN/DM articles | a held-out subreddit
    {data_dir}/cnndm/                                  tldr: the raw CNN/DM url list, titles and .story files
"""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model import autocast, reward_at_eos, sample_responses, trim_padding
from support.files import cached_arrays
# What the stages use of the plumbing, so that `data.X` is the one name for each: file formats, tokenizers, ROUGE.
from support.formats import (DataError, as_response, comparison_record, read_axis_evals, read_cnndm,  # noqa: F401
                             read_comparisons, read_tldr, register_synthetic_world, subreddit_name, synthetic_world,
                             write_jsonl)
from support.rouge import copying, mean_rouge, rouge  # noqa: F401
from support.tokenizers import PAT_ASCII, SYNTH_TOKENIZER, get_tokenizer  # noqa: F401

# Per-task defaults, read by every stage. Query and response lengths are in tokens of the task's tokenizer; the
# response length includes the EOS token. tldr: the paper's 512-token query and 48-token summaries (Section 3.2).
# rm_response_len is the room for a compared summary: a sample that ran to the length limit without EOS, plus the
# EOS the reward model reads its score at, is longer than response_len (the official tldr_rm_task reads 128).
TASKS = {
    "tldr": dict(tokenizer="gpt2", query_len=512, response_len=48, rm_response_len=128, data_dir="data/tldr",
                 files=dict(train="train.jsonl", valid="valid.jsonl", test="test.jsonl", transfer="cnndm_test.jsonl")),
    "synth": dict(tokenizer=SYNTH_TOKENIZER, query_len=104, response_len=32, rm_response_len=48, data_dir="data/synth",
                  files=dict(train="train.jsonl", valid="valid.jsonl", test="test.jsonl", transfer="transfer.jsonl")),
}
# Query templates of OpenAI's released code (summarize-from-feedback). `cnndm` is `tldr_zero_shot_cnndm_task`: a
# TL;DR policy applied to news articles, the paper's transfer evaluation (Section 4.2). The named field is cut when
# too long.
TEMPLATES = {
    "tldr": ("SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:", "post"),
    "cnndm": ("{article}\n\nTL;DR:", "article"),
}
CACHE_VERSION = 1  # bump when the layout of prepared arrays changes


# ----------------------------------------------------------------------------------------------------------------
# tokens

def pad_id(enc):
    """PAD is one past the vocabulary (never EOS: a model that pads with EOS never learns to stop). The model's
    embedding table has this row; padded positions are masked (`tokens != pad_id(enc)`)."""
    return enc.n_vocab


# ----------------------------------------------------------------------------------------------------------------
# the splits, read with the readers of the released formats (support/formats.py)

def split_path(task, split, data_dir=None):
    """The file of one split (train/valid/test/transfer) of a task."""
    return Path(data_dir or TASKS[task]["data_dir"]) / TASKS[task]["files"][split]


def load_split(task, split, data_dir=None, skip_bad=False):
    """The records of one split (train/valid/test/transfer) of a task, from its data directory."""
    path = split_path(task, split, data_dir)
    if not path.is_file():
        how = "python -m support.openai_data" if task == "tldr" else "python synth.py"
        raise DataError(f"{path} not found; run `{how}` (or pass the directory that holds it)")
    if task == "tldr" and split == "transfer":
        records = read_cnndm(path, skip_bad)
    else:
        # a synthetic post edited by hand would fail the gold labeler only at the end of a run
        check = synthetic_world("check_post") if task == "synth" else None
        records = read_tldr(path, skip_bad, check)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


# ----------------------------------------------------------------------------------------------------------------
# queries, responses and the tokenized arrays the stages train on

def _fill(record, template):
    fmt, field = TEMPLATES[template or ("cnndm" if record.get("article") else "tldr")]
    fields = {k: record.get(k) or "" for k in ("subreddit", "title", "post", "article")}
    fields["subreddit"] = subreddit_name(fields["subreddit"])
    return fmt, field, fields


def format_query(record, enc, max_query_tokens, template=None):
    """The query text of a record: the `tldr` template, or `cnndm` for an article (picked from the record unless
    named). Too long: cut the post (article) at its last newline until it fits, one character at a time when no
    newline is left: the rule of OpenAI's code, so the queries are the paper's."""
    fmt, field, fields = _fill(record, template)
    text = fmt.format(**fields)
    while len(enc.encode_ordinary(text)) > max_query_tokens:
        if not fields[field]:
            raise DataError(f"record {record.get('id')}: the query is longer than {max_query_tokens} tokens even "
                            f"with an empty {field}")
        cut = fields[field].rfind("\n")
        fields[field] = fields[field][:cut if cut >= 0 else _longest_fit(fmt, fields, field, enc, max_query_tokens)]
        text = fmt.format(**fields)
    return text


def _longest_fit(fmt, fields, field, enc, max_query_tokens):
    """Where the one-character-at-a-time cut stops: the longest proper prefix of the field whose query fits, found by
    bisection in about 20 encodes instead of one per character (a 100k-character line took 19 minutes). The token
    count grows with the prefix, so this is the loop's answer; 0 when even the empty field does not fit."""
    lo, hi = 0, len(fields[field]) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        query = fmt.format(**{**fields, field: fields[field][:mid]})
        lo, hi = (mid, hi) if len(enc.encode_ordinary(query)) <= max_query_tokens else (lo, mid - 1)
    return lo


def _encode_queries(records, enc, max_query_tokens, template):
    """Token lists of the queries; one batched (multi-threaded) encode, the rare too-long ones truncated after."""
    texts = [fmt.format(**fields) for fmt, _, fields in (_fill(r, template) for r in records)]
    unique = list(dict.fromkeys(texts))  # comparisons repeat each post many times
    tokens = {}
    for i in tqdm(range(0, len(unique), 4096), desc="tokenizing queries", disable=len(unique) < 4096):
        chunk = unique[i:i + 4096]
        tokens.update(zip(chunk, enc.encode_ordinary_batch(chunk)))
    out = [tokens[t] for t in texts]
    for i, toks in enumerate(out):
        if len(toks) > max_query_tokens:
            out[i] = enc.encode_ordinary(format_query(records[i], enc, max_query_tokens, template))
    return out


def _encode_responses(texts, enc):
    """Tokens of `as_response(text)` + EOS: the SFT target and what the reward model scores (read at the EOS)."""
    return [t + [enc.eot_token] for t in enc.encode_ordinary_batch([as_response(x) for x in texts])]


def _pad(rows, width, pad, left):
    out = np.full((len(rows), width), pad, dtype=np.int32)
    for i, row in enumerate(rows):
        if left:
            out[i, width - len(row):] = row
        else:
            out[i, :len(row)] = row
    return out


def prepare_sft(records, enc, max_query_tokens, max_response_tokens, cache_dir=None, template=None):
    """Records with a `summary` -> {query (N, Lq) int32 left-padded, response (N, Lr) int32 right-padded, index (N,)
    the rows of `records` kept}. Padding is `pad_id(enc)`. A reference that does not fit with its EOS is dropped
    and counted, never truncated: a cut target would teach the policy to run to the length limit."""
    def build():
        queries = _encode_queries(records, enc, max_query_tokens, template)
        responses = _encode_responses([r["summary"] for r in records], enc)
        keep = [i for i, r in enumerate(responses) if len(r) <= max_response_tokens]
        return dict(query=_pad([queries[i] for i in keep], max_query_tokens, pad_id(enc), left=True),
                    response=_pad([responses[i] for i in keep], max_response_tokens, pad_id(enc), left=False),
                    index=np.array(keep, dtype=np.int64)), dict(dropped_long=len(records) - len(keep))
    return cached_arrays("sft", [enc.name, max_query_tokens, max_response_tokens, template], records, build, cache_dir,
                         CACHE_VERSION)


def prepare_comparisons(records, enc, max_query_tokens, max_response_tokens, cache_dir=None):
    """Records from `read_comparisons` -> {query, response0, response1 (as in prepare_sft), choice (N,) int8,
    confidence (N,) int8 (0 = unknown), is_cnndm (N,) bool, split, batch, worker, policy0, policy1 (N,) str,
    index (N,)}. CNN/DM rows get the transfer template. A pair with a response too long for its EOS is dropped."""
    def build():
        queries = _encode_queries(records, enc, max_query_tokens, None)
        r0 = _encode_responses([r["summaries"][0] for r in records], enc)
        r1 = _encode_responses([r["summaries"][1] for r in records], enc)
        keep = [i for i in range(len(records)) if max(len(r0[i]), len(r1[i])) <= max_response_tokens]
        rows = [records[i] for i in keep]
        arrays = dict(query=_pad([queries[i] for i in keep], max_query_tokens, pad_id(enc), left=True),
                      response0=_pad([r0[i] for i in keep], max_response_tokens, pad_id(enc), left=False),
                      response1=_pad([r1[i] for i in keep], max_response_tokens, pad_id(enc), left=False),
                      choice=np.array([r["choice"] for r in rows], dtype=np.int8),
                      confidence=np.array([r["confidence"] or 0 for r in rows], dtype=np.int8),
                      is_cnndm=np.array([r["is_cnndm"] for r in rows], dtype=bool),
                      index=np.array(keep, dtype=np.int64))
        arrays.update({k: np.array(v, dtype=str) for k, v in dict(  # fixed-width unicode: loads without pickle
            split=[r["split"] for r in rows], batch=[r["batch"] for r in rows], worker=[r["worker"] for r in rows],
            policy0=[r["policies"][0] for r in rows], policy1=[r["policies"][1] for r in rows]).items()})
        return arrays, dict(dropped_long=len(records) - len(keep))
    return cached_arrays("comparisons", [enc.name, max_query_tokens, max_response_tokens], records, build, cache_dir,
                         CACHE_VERSION)


# ----------------------------------------------------------------------------------------------------------------
# sampled responses: their text and ROUGE against a reference

def decode_responses(enc, tokens):
    """(N, R) int tokens of sampled responses (numpy or torch) -> N strings, each row up to (not including) its first
    EOS or PAD. Nothing else is stripped: a response keeps its leading space, as summaries are " " + text."""
    stop = {enc.eot_token, pad_id(enc)}
    texts = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(enc.decode(row[:end]))
    return texts


# ----------------------------------------------------------------------------------------------------------------
# writing data: our files in the original formats, and the comparisons of step 1

def make_pairs(records, candidates, rng, ref_fraction=0.25, pairs_per_record=1):
    """The pairs of step 1 (Section 3.1): two summaries of the same post in random order. candidates[i] lists
    (policy, text) summaries of records[i] - several samples of one policy are fine, as the paper mostly compared
    samples of its current policies with each other (Section 3.1, C.1). With probability ref_fraction one side is the
    reference (policy "ref") instead. Yields (record, [(policy, text), (policy, text)]) lazily, so a caller that
    draws from the same numpy Generator `rng` between pairs keeps one fixed order of draws."""
    for rec, cands in zip(records, candidates):
        cands = list({text: (policy, text) for policy, text in cands}.values())  # two equal samples say nothing
        for _ in range(pairs_per_record):
            if len(cands) < 2 or rng.random() < ref_fraction:
                pair = [cands[int(rng.integers(len(cands)))], ("ref", rec["summary"])]
                pair = pair[::-1] if rng.random() < 0.5 else pair
            else:
                pair = [cands[j] for j in rng.choice(len(cands), size=2, replace=False)]
            yield rec, pair


def sample_candidates(policies, records, enc, task, samples=2, temperature=1.0, **sampling):
    """`samples` summaries of each record from each policy ({name: model}) at a temperature that gives variety:
    candidates[i] lists (name, text) for records[i], the input of `make_pairs`. sampling: batch_size, device, dtype,
    generator for `summarize`."""
    candidates = [[] for _ in records]
    for name, policy in policies.items():
        for _ in range(samples):
            texts = summarize(policy, records, enc, task, temperature, desc=f"{name}: sampling", **sampling)
            for cands, text in zip(candidates, texts):
                cands.append((name, text))
    return candidates


def collect_comparisons(records, candidates, labelers, rng, ref_fraction=0.25, pairs_per_record=1, split="train",
                        batch="synth0"):
    """Step 1 with labelers at hand: each pair of `make_pairs` shown to a random labeler, the choice recorded.
    Returns comparison dicts in the original format (`comparison_record`); write them with `write_jsonl`. A labeler
    is any object with `.worker` and `.compare(record, text0, text1) -> (choice, confidence)`: a synth.Labeler.
    People label through label.py's page instead."""
    out = []
    for rec, pair in make_pairs(records, candidates, rng, ref_fraction, pairs_per_record):
        labeler = labelers[int(rng.integers(len(labelers)))]
        choice, confidence = labeler.compare(rec, as_response(pair[0][1]), as_response(pair[1][1]))
        out.append(comparison_record(rec, pair, choice, labeler.worker, split, batch, confidence))
    return out


def batch_indices(n, batch_size, step, seed):
    """The examples of optimizer step `step`: epoch e reads a permutation seeded by (seed, e), so the order is a
    function of the step alone and a resumed run reads exactly what an uninterrupted one would."""
    if not 0 < batch_size <= n:
        raise DataError(f"{n} examples make no batch of {batch_size}: use more data or a smaller batch")
    epoch, k = divmod(step, n // batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


def tensors(arrays, rows, keys, device):
    """The given rows of prepared arrays as int64 tensors on a device, one per key."""
    return tuple(torch.as_tensor(arrays[k][rows], device=device).long() for k in keys)


def encode_queries(records, enc, max_query_tokens, template=None):
    """(N, max_query_tokens) int32 left-padded queries of records, uncached (for sampling, not training)."""
    return _pad(_encode_queries(records, enc, max_query_tokens, template), max_query_tokens, pad_id(enc), left=True)


def summarize(policy, records, enc, task, temperature=0.0, batch_size=64, device="cpu", dtype=None, generator=None,
              desc=None, with_ended=False):
    """The summaries a policy (a GPT with the LM head) writes for records: their queries, sampled at temperature
    (0 = argmax) up to the task's response length, decoded up to EOS. with_ended: also (N,) bool, whether each
    summary ended with an EOS within the length (PPO scores one that did not with its --no-eos-score)."""
    queries = encode_queries(records, enc, TASKS[task]["query_len"])
    tokens = sample_responses(policy, queries, TASKS[task]["response_len"], temperature, enc.eot_token, pad_id(enc),
                              batch_size, device, dtype, generator, desc)
    texts = decode_responses(enc, tokens)
    return (texts, (tokens == enc.eot_token).any(1).numpy()) if with_ended else texts


def summary_batches(records, texts, enc, task, batch_size, device, skip_long=False):
    """texts[i] as the summary of records[i], tokenized as the reward model reads them (query + `as_response` +
    EOS, up to the task's rm_response_len), in batches: yields (tokens (B, T), n_query, rows), padding trimmed; rows
    are the batch's indices into texts. A summary longer than the RM reads is an error, or with skip_long left out
    (absent from every rows)."""
    spec = TASKS[task]
    arrays = prepare_sft([dict(r, summary=t) for r, t in zip(records, texts)], enc, spec["query_len"],
                         spec["rm_response_len"])
    if len(arrays["index"]) != len(texts) and not skip_long:
        raise ValueError(f"{len(texts) - len(arrays['index'])} summaries are longer than the reward model reads "
                         f"({spec['rm_response_len']} tokens with the EOS)")
    for i in range(0, len(arrays["index"]), batch_size):
        q, r = tensors(arrays, slice(i, i + batch_size), ("query", "response"), device)
        tokens, cut = trim_padding(torch.cat([q, r], 1), pad_id(enc))
        yield tokens, q.size(1) - cut, arrays["index"][i:i + batch_size]


@torch.no_grad()
def score_summaries(rm, records, texts, enc, task, batch_size=64, device="cpu", dtype=None, ended=None,
                    no_eos_score=-1.0):
    """A reward model's score of texts[i] as a summary of records[i], read at its EOS as in training. Returns (N,)
    float numpy. As in PPO, a summary that never ended (ended[i] False: no EOS within the response length) gets
    no_eos_score rather than a score of the text with an EOS it never wrote; so does one whose text re-tokenizes
    past what the reward model reads (a tiny policy's stray bytes)."""
    out = np.full(len(texts), no_eos_score, dtype=np.float32)
    scored = np.flatnonzero(np.ones(len(texts), dtype=bool) if ended is None else np.asarray(ended, dtype=bool))
    if not len(scored):
        return out
    for tokens, _, rows in summary_batches([records[i] for i in scored], [texts[i] for i in scored], enc, task,
                                           batch_size, device, skip_long=True):
        with autocast(device, dtype):
            out[scored[rows]] = reward_at_eos(rm, tokens, (tokens != pad_id(enc)).long(), enc.eot_token).cpu().numpy()
    return out
