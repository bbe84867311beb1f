"""Data for both tasks: the paper's Reddit TL;DR (`tldr`) and an offline synthetic TL;DR (`synth`).

    python -m support.openai_data              # OpenAI's files -> data/tldr/ (resumable)
    python synth.py --seed 0                   # synthetic posts -> data/synth/ (the world, gold and labelers: synth.py)

Everything a stage consumes comes from here: the tokenizers, readers for each original file format (they return
plain dicts), `format_query` (the one place the query is built), tokenized tensors cached on disk, the decoding of
sampled responses and their ROUGE, comparison collection (the paper's step 1, with any labelers) and the writer of
comparisons in the original format. synth.py makes the synthetic task's files (and hands over its world's words
and post check: `register_synthetic_world`); this module only reads them.

Layout of a task's data directory (the same for both tasks, so the stages have one code path):
    {data_dir}/train.jsonl valid.jsonl test.jsonl      posts + reference TL;DRs (tldr_3_filtered format)
    {data_dir}/comparisons/*.json                      pairwise comparisons (original JSON-lines format)
    {data_dir}/axis_evals/*.json                       Likert ratings (tldr only)
    {data_dir}/cnndm_test.jsonl | transfer.jsonl       the transfer set: CNN/DM articles | a held-out subreddit
    {data_dir}/cnndm/                                  tldr: the raw CNN/DM url list, titles and .story files
"""
import functools
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

from model import autocast, reward_at_eos, sample_responses, trim_padding
from support.files import atomic_open, atomic_write

SYNTH_TOKENIZER = "synth-words-v1"
# Per-task defaults, read by every stage. Query and response lengths are in tokens of the task's tokenizer; the
# response length includes the EOS token. tldr: the paper's 512-token query and 48-token summaries (Section 3.2).
# rm_response_len is the room for a compared summary: a sample that ran to the length limit without EOS, plus the
# EOS the reward model reads its score at, is longer than response_len (the official tldr_rm_task reads 128).
TASKS = {
    "tldr": dict(tokenizer="gpt2", query_len=512, response_len=48, rm_response_len=128, data_dir="data/tldr",
                 files=dict(train="train.jsonl", valid="valid.jsonl", test="test.jsonl", transfer="cnndm_test.jsonl")),
    "synth": dict(tokenizer=SYNTH_TOKENIZER, query_len=96, response_len=32, rm_response_len=48, data_dir="data/synth",
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


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line) to look at."""


# ----------------------------------------------------------------------------------------------------------------
# tokenizers

# GPT-2's pre-tokenizer regex. The synthetic tokenizer uses it too, so each world word is one regex piece.
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same on ASCII text, in Python's re (no \p{..} classes): synth.py splits the world's text into words with it.
PAT_ASCII = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


# What this module needs of the synthetic world, which lives in synth.py: the words of its tokenizer and the check of
# a post. synth.py imports this module and hands them over when imported (`register_synthetic_world`), so this module
# never imports synth.py.
_SYNTHETIC_WORLD = {}


def register_synthetic_world(world, words, check_post):
    """world: the id prefix of the synthetic records ("synth1"); words(): every word the world can write (the synth
    tokenizer's vocabulary); check_post(record): raises DataError for a post its id does not generate."""
    _SYNTHETIC_WORLD.update(world=world, words=words, check_post=check_post)


def synthetic_world(key):
    """One of the pieces synth.py registered; an error saying what to import where it has not been imported."""
    if not _SYNTHETIC_WORLD:
        raise DataError("the synthetic task needs synth.py's world: `import synth` before reading its data")
    return _SYNTHETIC_WORLD[key]


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """'gpt2' (GPT-2 BPE, tiktoken's r50k_base) or 'synth-words-v1'. EOS is `enc.eot_token`, PAD is `pad_id(enc)`."""
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken raises whatever its HTTP client raises when it cannot fetch the ranks
            raise DataError("could not load the GPT-2 BPE (tiktoken r50k_base). Offline, set TIKTOKEN_CACHE_DIR to a "
                            f"folder holding the cached ranks (tiktoken stores them there when online): {e}") from e
    if name == SYNTH_TOKENIZER:
        # Word level: the 256 single bytes (so any text still encodes) plus every word of the closed synthetic world,
        # with and without its leading space, as one token each. tiktoken maps a regex piece found in the ranks
        # straight to its id, so no merge chain is needed. Sequences are ~5x shorter than bytes and copying a fact
        # from the post is a one-token act, which is what lets a tiny CPU model learn the task in minutes.
        ranks = {bytes([b]): b for b in range(256)}
        for word in sorted(synthetic_world("words")()):
            for piece in (word, " " + word):
                ranks.setdefault(piece.encode(), len(ranks))
        return tiktoken.Encoding(name, pat_str=PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
    raise DataError(f"unknown tokenizer {name!r}; expected 'gpt2' or {SYNTH_TOKENIZER!r}")


def pad_id(enc):
    """PAD is one past the vocabulary (never EOS: a model that pads with EOS never learns to stop). The model's
    embedding table has this row; padded positions are masked (`tokens != pad_id(enc)`)."""
    return enc.n_vocab


# ----------------------------------------------------------------------------------------------------------------
# readers for the formats of OpenAI's released files, each named in its docstring with the fields it reads. Each
# returns a list of plain dicts.

def _read_jsonl(path, convert, skip_bad):
    """Convert each JSON line of `path`. A bad line raises DataError naming file:line, or with `skip_bad` is skipped,
    counted and reported. Lines are split on b"\\n" only: decoded text may hold U+2028, which splitlines() splits."""
    path, out, bad, first = Path(path), [], 0, None
    if not path.is_file():
        raise DataError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        f = open(path, "rb")
    except OSError as e:  # no read permission: one line, not a traceback
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    raise DataError("empty line")
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise DataError("not a JSON object")
                if "\\u" in text:  # "\ud800" decodes to a lone surrogate: no character, and no UTF-8 file can hold it
                    try:
                        json.dumps(obj, ensure_ascii=False).encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise DataError(f"a lone surrogate \\u{ord(e.object[e.start]):04x} (half of a UTF-16 pair) "
                                        f"after {e.object[max(0, e.start - 30):e.start]!r}") from None
                out.append(convert(obj))
            except UnicodeDecodeError as e:
                err = f"invalid UTF-8 at byte {e.start}"
            except json.JSONDecodeError as e:
                err = f"malformed JSON ({e.msg} at column {e.colno})"
            except DataError as e:
                err = str(e)
            else:
                continue
            if not skip_bad:
                raise DataError(f"{path}:{lineno}: {err}")
            bad += 1
            first = first or f"line {lineno}: {err}"
    if bad:
        print(f"warning: {path}: skipped {bad} bad line(s) (first at {first})", file=sys.stderr)
    return out


def _get(obj, key, kind=str, required=True):
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"missing field {key!r}")
        return None
    if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):  # JSON true is not a 1
        raise DataError(f"field {key!r} should be {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _document(info):
    """The source document of a comparison or axis eval: a Reddit post or a CNN/DM article, quirks normalized."""
    doc = dict(id=_get(info, "id", required=False), title=_get(info, "title", required=False),
               subreddit=None, post=None, site=None, article=None, is_cnndm="article" in info)
    if doc["is_cnndm"]:
        doc.update(article=_get(info, "article"), site=_get(info, "site", required=False))
    else:
        doc.update(post=_get(info, "post"), title=_get(info, "title"), subreddit=_subreddit(_get(info, "subreddit")))
        if not doc["post"].strip():
            raise DataError("empty post")
    return doc


def _subreddit(name):
    return name[2:] if name.startswith("r/") else name  # edit_b2_eval_test writes "r/relationships"


def as_response(text):
    """The response convention: exactly one leading space (the text follows 'TL;DR:'), then the summary. Real
    comparison texts have one space, none (edit_b2_eval_test), a no-break space (some CNN/DM) or are empty."""
    return " " + text.lstrip()


def read_tldr(path, skip_bad=False, check=None):
    """tldr_3_filtered {split}.jsonl -> [{id, subreddit, title, post, summary}]; summary without its leading space.
    check(record), when given, raises DataError for a record that is well-formed but unusable (its file:line named)."""
    def convert(obj):
        rec = {k: _get(obj, k) for k in ("id", "subreddit", "title", "post", "summary")}
        for field in ("post", "summary"):  # nothing to summarize, or nothing to learn from
            if not rec[field].strip():
                raise DataError(f"empty {field}")
        rec = dict(rec, subreddit=_subreddit(rec["subreddit"]))
        if check:
            check(rec)
        return rec
    return _read_jsonl(path, convert, skip_bad)


def read_comparisons(paths, skip_bad=False):
    """comparisons/*.json (one path or several) -> one dict per comparison: the document (id, subreddit, title, post,
    site, article, is_cnndm; absent fields None), summaries [text0, text1] normalized by `as_response`, policies,
    notes, choice (0/1), worker, batch, split (train/valid1/valid2), confidence (1-9, or None when `extra` is {}).
    A comparison already read from an earlier file is dropped: batch0_cnndm.json repeats cnndm0.json. A synthetic
    post that is not its world's (edited by hand) is refused here, not when its gold score is first needed."""
    def convert(obj):
        summaries = _get(obj, "summaries", list)
        if len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
            raise DataError("'summaries' should hold two objects")
        choice = _get(obj, "choice", int)
        if choice not in (0, 1):
            raise DataError(f"choice should be 0 or 1, got {choice}")
        confidence = (_get(obj, "extra", dict, required=False) or {}).get("confidence")
        doc = _document(_get(obj, "info", dict))
        world = _SYNTHETIC_WORLD.get("world")  # None where synth.py is not imported: only real data is read
        if world and str(doc["id"]).startswith(world + "_") and doc["post"] is not None:
            _SYNTHETIC_WORLD["check_post"](doc)
        return dict(doc, summaries=[as_response(_get(s, "text")) for s in summaries],
                    policies=[_get(s, "policy") for s in summaries], notes=[s.get("note") for s in summaries],
                    choice=choice, worker=_get(obj, "worker"), batch=_get(obj, "batch"), split=_get(obj, "split"),
                    confidence=confidence)
    out, seen, dropped = [], set(), 0
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        keys = []
        for rec in _read_jsonl(path, convert, skip_bad):
            key = json.dumps([rec[k] for k in ("id", "title", "post", "article", "summaries", "policies", "choice",
                                               "worker", "split")])
            if key in seen:
                dropped += 1
            else:
                out.append(rec)
                keys.append(key)
        seen.update(keys)  # only across files: two identical lines inside one file are two real judgments
    if dropped:
        print(f"note: dropped {dropped} comparisons repeated from an earlier file (e.g. batch0_cnndm = cnndm0)",
              file=sys.stderr)
    return out


def read_axis_evals(path, skip_bad=False):
    """axis_evals/*.json -> [{document fields, summary, policy, note, axes{overall, accuracy, coverage, coherence,
    compatible} (None where missing; 1-7 Likert), worker, batch, split}]."""
    def convert(obj):
        s = _get(obj, "summary", dict)
        axes = _get(s, "axes", dict)
        return dict(_document(_get(obj, "info", dict)), summary=as_response(_get(s, "text")), policy=_get(s, "policy"),
                    note=s.get("note"), axes={k: axes.get(k) for k in ("overall", "accuracy", "coverage", "coherence",
                                                                        "compatible")},
                    worker=_get(obj, "worker"), batch=_get(obj, "batch"), split=_get(obj, "split"))
    return _read_jsonl(path, convert, skip_bad)


def read_cnndm(path, skip_bad=False):
    """Processed CNN/DM articles, one JSON object per line as OpenAI's loader yields them ({article, reference, id,
    site, title}) -> [{id, site, title, article, summary}]; `summary` is the reference (highlights)."""
    def convert(obj):
        rec = dict(id=_get(obj, "id"), site=_get(obj, "site"), title=_get(obj, "title", required=False),
                   article=_get(obj, "article"), summary=_get(obj, "reference"))
        if not rec["article"].strip():
            raise DataError("empty article")
        return rec
    return _read_jsonl(path, convert, skip_bad)


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
    fields["subreddit"] = _subreddit(fields["subreddit"])
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


def _cached(kind, key_parts, records, build, cache_dir):
    """Arrays from `build()`, cached in cache_dir as {kind}-{key}.npz + .json. The key hashes what made them: the
    records' content, tokenizer and lengths. The JSON is written last, so a half-written cache is never used; one
    damaged later (emptied, cut, overwritten) is built anew, saying so."""
    if cache_dir is None:
        return build()[0]
    h = hashlib.sha256(json.dumps([CACHE_VERSION, kind, key_parts]).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True).encode())
    key = h.hexdigest()
    npz, meta = Path(cache_dir) / f"{kind}-{key[:16]}.npz", Path(cache_dir) / f"{kind}-{key[:16]}.json"
    if meta.is_file() and npz.is_file():
        where = meta
        try:  # an emptied, cut or overwritten cache is built anew, not a failure of every later run
            saved = json.loads(meta.read_text())
            if saved.get("key") == key:
                where = npz
                with np.load(npz, allow_pickle=False) as z:
                    arrays = dict(z)  # reads every array, so the zip's CRCs are checked
                if len(arrays["index"]) != saved["rows"]:
                    raise ValueError(f"{len(arrays['index'])} rows where {meta.name} says {saved['rows']}")
                return arrays
        except Exception as e:
            print(f"data: the cached {where} is damaged or unreadable ({type(e).__name__}: {e}); building it anew",
                  file=sys.stderr)
    arrays, info = build()
    with atomic_open(npz, "wb") as f:
        np.savez(f, **arrays)
    atomic_write(meta, json.dumps(dict(key=key, kind=kind, params=key_parts, rows=len(arrays["index"]), **info),
                                  indent=1) + "\n")
    print(f"data: prepared {len(arrays['index']):,} {kind} rows -> {npz} {info}")
    return arrays


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
    return _cached("sft", [enc.name, max_query_tokens, max_response_tokens, template], records, build, cache_dir)


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
    return _cached("comparisons", [enc.name, max_query_tokens, max_response_tokens], records, build, cache_dir)


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


def _rouge_tokens(text):
    # rouge-score's default tokenizer: lowercase, anything but a-z and 0-9 becomes a space, split on whitespace
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _fmeasure(overlap, n_prediction, n_reference):
    precision, recall = overlap / max(n_prediction, 1), overlap / max(n_reference, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge(prediction, reference):
    """{rouge1, rouge2, rougeL} F-measures of one prediction against one reference; the values of Google's
    `rouge-score` (RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)), 0 when either text has no
    tokens. ROUGE-N counts each n-gram of the prediction at most as often as the reference has it; ROUGE-L is the
    longest common subsequence of the two token lists. The paper finds that ROUGE agrees poorly with its labelers
    (Section 4.4): a secondary metric here."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    out = {}
    for n in (1, 2):
        p, r = (Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1)) for t in (pred, ref))
        out[f"rouge{n}"] = _fmeasure(sum((p & r).values()), sum(p.values()), sum(r.values()))  # & is the clipped min
    out["rougeL"] = _fmeasure(_lcs(ref, pred), len(pred), len(ref))
    return out


def _lcs(a, b):
    """Length of the longest common subsequence of two sequences, one row of the table at a time."""
    prev = [0] * (len(b) + 1)  # prev[j]: LCS of a so far and b[:j]
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def copying(summary, source):
    """How much a summary copies its source (the paper's Section 4.4, footnote 9): the longest common subsequence of
    the summary's word bigrams with the source's (post or article), divided by the summary's number of bigrams. 1 is
    a verbatim excerpt; 0 when the summary has no bigram. Words as ROUGE tokenizes them."""
    s, p = _rouge_tokens(summary), _rouge_tokens(source)
    s_bigrams, p_bigrams = list(zip(s, s[1:])), list(zip(p, p[1:]))
    return _lcs(s_bigrams, p_bigrams) / len(s_bigrams) if s_bigrams else 0.0


def mean_rouge(predictions, references):
    """The mean of each `rouge` F-measure over pairs of texts."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one: {len(predictions)} vs "
                         f"{len(references)}")
    scores = [rouge(p, r) for p, r in zip(predictions, references)]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}


# ----------------------------------------------------------------------------------------------------------------
# writing data: our files in the original formats, and the comparisons of step 1

def write_jsonl(path, objs):
    """One `json.dumps(obj)` per line with Python's defaults (ASCII, ', ' and ': '): byte for byte the format of
    OpenAI's files, so comparisons we collect sit next to theirs and go through the same readers."""
    atomic_write(path, "".join(json.dumps(o) + "\n" for o in objs))


def comparison_record(rec, summaries, choice, worker, split, batch, confidence=None, notes=(None, None), axes=None):
    """One comparison in the format and key order of OpenAI's comparisons/*.json: info, split, summaries [{text,
    policy, note}] in the order shown, choice (0/1), worker, batch, extra {confidence: 1-9}. summaries: two
    (policy, text) pairs. axes: for each summary a dict of the 1-7 ratings given (overall, accuracy, coverage,
    coherence), stored as summaries[i].axes, the field the released axis evals use; left out when none was given."""
    rows = [dict(text=as_response(text), policy=policy, note=note) for (policy, text), note in zip(summaries, notes)]
    for row, given in zip(rows, axes or ({}, {})):
        if given:
            row["axes"] = dict(given)
    return dict(info=dict(id=rec["id"], post=rec["post"], title=rec["title"], subreddit=rec["subreddit"]),
                split=split, summaries=rows, choice=choice, worker=worker, batch=batch,
                extra={} if confidence is None else dict(confidence=confidence))


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
            out[scored[rows]] = reward_at_eos(rm, tokens, (tokens != pad_id(enc)).long()).float().cpu().numpy()
    return out
