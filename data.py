"""Data for both tasks: the paper's Reddit TL;DR (`tldr`) and an offline synthetic TL;DR (`synth`).

    python data.py download                    # OpenAI's files -> data/tldr/ (resumable)
    python data.py synth --seed 0              # synthetic posts -> data/synth/, prints labeler agreement

Everything a stage consumes comes from here: the tokenizers, readers for each original file format (they return
plain dicts), `format_query` (the one place the query is built), tokenized tensors cached on disk, the synthetic
world with its gold labeler and simulated labelers, and the writer of comparisons in the original format.

Layout of a task's data directory (the same for both tasks, so the stages have one code path):
    {data_dir}/train.jsonl valid.jsonl test.jsonl      posts + reference TL;DRs (tldr_3_filtered format)
    {data_dir}/comparisons/*.json                      pairwise comparisons (original JSON-lines format)
    {data_dir}/axis_evals/*.json                       Likert ratings (tldr only)
    {data_dir}/cnndm_test.jsonl | transfer.jsonl       the transfer set: CNN/DM articles | a held-out subreddit
    {data_dir}/cnndm/                                  tldr: the raw CNN/DM url list, titles and .story files
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

SYNTH_TOKENIZER = "synth-words-v1"
# Per-task defaults, read by every stage. Query and response lengths are in tokens of the task's tokenizer; the
# response length includes the EOS token. tldr: the paper's 512-token query and 48-token summaries (Section 3.2).
TASKS = {
    "tldr": dict(tokenizer="gpt2", query_len=512, response_len=48, data_dir="data/tldr",
                 files=dict(train="train.jsonl", valid="valid.jsonl", test="test.jsonl", transfer="cnndm_test.jsonl")),
    "synth": dict(tokenizer=SYNTH_TOKENIZER, query_len=96, response_len=32, data_dir="data/synth",
                  files=dict(train="train.jsonl", valid="valid.jsonl", test="test.jsonl", transfer="transfer.jsonl")),
}
# Query templates of the official code (FORMATS.md section 5). `cnndm` is `tldr_zero_shot_cnndm_task`: a TL;DR policy
# applied to news articles, the paper's transfer evaluation (Section 4.2). The named field is cut when too long.
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
PAT_ASCII = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """'gpt2' (GPT-2 BPE, tiktoken's r50k_base) or 'synth-words-v1'. EOS is `enc.eot_token`, PAD is `pad_id(enc)`."""
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken raises whatever its HTTP client raises when it cannot fetch the ranks
            raise DataError("could not load the GPT-2 BPE (tiktoken r50k_base). Offline, set TIKTOKEN_CACHE_DIR to a "
                            f"folder holding the cached ranks (e.g. ../shared/tiktoken): {e}") from e
    if name == SYNTH_TOKENIZER:
        # Word level: the 256 single bytes (so any text still encodes) plus every word of the closed synthetic world,
        # with and without its leading space, as one token each. tiktoken maps a regex piece found in the ranks
        # straight to its id, so no merge chain is needed. Sequences are ~5x shorter than bytes and copying a fact
        # from the post is a one-token act, which is what lets a tiny CPU model learn the task in minutes.
        ranks = {bytes([b]): b for b in range(256)}
        for word in sorted(_world_words()):
            for piece in (word, " " + word):
                ranks.setdefault(piece.encode(), len(ranks))
        return tiktoken.Encoding(name, pat_str=PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
    raise DataError(f"unknown tokenizer {name!r}; expected 'gpt2' or {SYNTH_TOKENIZER!r}")


def pad_id(enc):
    """PAD is one past the vocabulary (never EOS: a model that pads with EOS never learns to stop). The model's
    embedding table has this row; padded positions are masked (`tokens != pad_id(enc)`)."""
    return enc.n_vocab


# ----------------------------------------------------------------------------------------------------------------
# readers for the original formats (FORMATS.md). Each returns a list of plain dicts.

def _read_jsonl(path, convert, skip_bad):
    """Convert each JSON line of `path`. A bad line raises DataError naming file:line, or with `skip_bad` is skipped,
    counted and reported. Lines are split on b"\\n" only: decoded text may hold U+2028, which splitlines() splits."""
    path, out, bad, first = Path(path), [], 0, None
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    raise DataError("empty line")
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise DataError("not a JSON object")
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
    if not isinstance(obj[key], kind):
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


def read_tldr(path, skip_bad=False):
    """tldr_3_filtered {split}.jsonl -> [{id, subreddit, title, post, summary}]; summary without its leading space."""
    def convert(obj):
        rec = {k: _get(obj, k) for k in ("id", "subreddit", "title", "post", "summary")}
        if not rec["post"].strip():
            raise DataError("empty post")
        return dict(rec, subreddit=_subreddit(rec["subreddit"]))
    return _read_jsonl(path, convert, skip_bad)


def read_comparisons(paths, skip_bad=False):
    """comparisons/*.json (one path or several) -> one dict per comparison: the document (id, subreddit, title, post,
    site, article, is_cnndm; absent fields None), summaries [text0, text1] normalized by `as_response`, policies,
    notes, choice (0/1), worker, batch, split (train/valid1/valid2), confidence (1-9, or None when `extra` is {}).
    A comparison already read from an earlier file is dropped: batch0_cnndm.json repeats cnndm0.json."""
    def convert(obj):
        summaries = _get(obj, "summaries", list)
        if len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
            raise DataError("'summaries' should hold two objects")
        choice = _get(obj, "choice", int)
        if choice not in (0, 1):
            raise DataError(f"choice should be 0 or 1, got {choice}")
        confidence = (_get(obj, "extra", dict, required=False) or {}).get("confidence")
        return dict(_document(_get(obj, "info", dict)), summaries=[as_response(_get(s, "text")) for s in summaries],
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


def load_split(task, split, data_dir=None, skip_bad=False):
    """The records of one split (train/valid/test/transfer) of a task, from its data directory."""
    path = Path(data_dir or TASKS[task]["data_dir"]) / TASKS[task]["files"][split]
    if not path.is_file():
        how = "python data.py download" if task == "tldr" else "python data.py synth"
        raise DataError(f"{path} not found; run `{how}` (or pass the directory that holds it)")
    return (read_cnndm if task == "tldr" and split == "transfer" else read_tldr)(path, skip_bad)


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
        fields[field] = fields[field][:cut] if cut >= 0 else fields[field][:-1]
        text = fmt.format(**fields)
    return text


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
    records' content, tokenizer and lengths. The JSON is written last, so a half-written cache is never used."""
    if cache_dir is None:
        return build()[0]
    h = hashlib.sha256(json.dumps([CACHE_VERSION, kind, key_parts]).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True).encode())
    key = h.hexdigest()
    npz, meta = Path(cache_dir) / f"{kind}-{key[:16]}.npz", Path(cache_dir) / f"{kind}-{key[:16]}.json"
    if meta.is_file() and npz.is_file() and json.loads(meta.read_text()).get("key") == key:
        with np.load(npz, allow_pickle=False) as z:
            return dict(z)
    arrays, info = build()
    npz.parent.mkdir(parents=True, exist_ok=True)
    with open(npz.with_suffix(".npz.tmp"), "wb") as f:
        np.savez(f, **arrays)
    os.replace(npz.with_suffix(".npz.tmp"), npz)
    _write_atomic(meta, json.dumps(dict(key=key, kind=kind, params=key_parts, rows=len(arrays["index"]), **info),
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


def _write_atomic(path, text):
    """Write to a temporary file, then rename: a killed run never leaves a partial file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path, objs):
    """One `json.dumps(obj)` per line with Python's defaults (ASCII, ', ' and ': '): byte for byte the format of
    OpenAI's files, so comparisons we collect sit next to theirs and go through the same readers."""
    _write_atomic(path, "".join(json.dumps(o) + "\n" for o in objs))


# ----------------------------------------------------------------------------------------------------------------
# download of the real data (addresses: FORMATS.md section 0)

BASE_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/"
TLDR_LINES = dict(train=116722, valid=6447, test=6553)
COMPARISON_FILES = [f"batch{i}" for i in range(3, 21)] + ["batch22", "batch0_cnndm", "cnndm0", "cnndm2",
                                                          "edit_b2_eval_test"]
AXIS_FILES = ["cnndm1", "cnndm3", "cnndm4", "tldraxis1", "tldraxis2"]
KNOWN_SHA256 = {  # PROVENANCE.md
    "batch18": "5008e223e287b4c38e434e270cf77301993adba70e1f87362f35fb928f83863a",
    "cnndm0": "be936926b85b8d42d708529bb4fae2470918cb0bd7d8d3eb3c7a4b4cb986225b",
    "edit_b2_eval_test": "6fa83abe0e2ecbae78644962af03c91bbf896db8ecaaf3ab672b8283a96c16c6",
}


def _check_file(path, remote):
    """What can be checked without the originals: line counts, JSON that the readers accept, known hashes."""
    stem = Path(remote).stem
    if remote.startswith("datasets/tldr_3_filtered/"):
        n = len(read_tldr(path))
        if n != TLDR_LINES[stem]:
            raise DataError(f"{path}: {n} records, expected {TLDR_LINES[stem]}")
    elif remote.startswith("dataset/comparisons/"):
        read_comparisons(path)
    elif remote.startswith("dataset/axis_evals/"):
        read_axis_evals(path)
    if stem in KNOWN_SHA256 and hashlib.sha256(Path(path).read_bytes()).hexdigest() != KNOWN_SHA256[stem]:
        raise DataError(f"{path}: sha256 differs from the published file")


def _fetch(url, dest, timeout, progress=True):
    """Download url -> dest via dest.part, resuming a partial file with an HTTP Range request."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {}),
                                    timeout=timeout) as resp:
            if have and resp.status != 206:
                have = 0  # the server ignored the range: start again
            total = have + int(resp.headers.get("Content-Length") or 0)
            bar = tqdm(total=total or None, initial=have, unit="B", unit_scale=True, desc=dest.name,
                       disable=not progress)
            with open(part, "ab" if have else "wb") as f, bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing left to fetch: the part file is whole
            return part
        raise DataError(f"{url}: HTTP error {e.code}") from e
    except OSError as e:
        raise DataError(f"{url}: {e}; run again to resume") from e
    if total and part.stat().st_size != total:
        raise DataError(f"{url}: received {part.stat().st_size} of {total} bytes; run again to resume")
    return part


def download(data_dir=None, base_url=BASE_URL, cnndm_n=1000, timeout=10.0):
    """Fetch the filtered TL;DR splits, all comparison batches, the axis evals and `cnndm_n` CNN/DM test articles
    (0 = all 11,490) into data_dir. A finished file is skipped, a partial one resumed; a file gets its final name only
    after its checks pass. Without network it fails within `timeout` seconds, saying what to place where."""
    data_dir = Path(data_dir or TASKS["tldr"]["data_dir"])
    plan = [(f"datasets/tldr_3_filtered/{s}.jsonl", f"{s}.jsonl") for s in TLDR_LINES]
    plan += [(f"dataset/comparisons/{b}.json", f"comparisons/{b}.json") for b in COMPARISON_FILES]
    plan += [(f"dataset/axis_evals/{b}.json", f"axis_evals/{b}.json") for b in AXIS_FILES]
    plan += [("datasets/cnndm/url_lists/all_test.txt", "cnndm/all_test.txt"), ("datasets/cnndm/titles.json",
                                                                              "cnndm/titles.json")]
    base_url = base_url.rstrip("/") + "/"
    try:
        urllib.request.urlopen(urllib.request.Request(base_url + plan[0][0], method="HEAD"), timeout=timeout).close()
    except (OSError, ValueError) as e:  # URLError, refused, timeout
        where = "\n".join(f"  {base_url}{remote}\n    -> {data_dir / local}" for remote, local in plan)
        raise DataError(f"cannot reach {base_url} ({e}). Download these files elsewhere and place them as shown; "
                        f"every reader also takes a local path. CNN/DM stories: {base_url}datasets/cnndm/cache_test/"
                        f"{{site}}/stories/{{sha1(url)}}.story -> {data_dir}/cnndm/stories/\n{where}") from e
    for remote, local in plan:
        dest = data_dir / local
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = _fetch(base_url + remote, dest, timeout)
        _check_file(part, remote)
        os.replace(part, dest)
    urls = [u.strip() for u in (data_dir / "cnndm/all_test.txt").read_text().split("\n") if u.strip()]
    titles = json.loads((data_dir / "cnndm/titles.json").read_text())
    records = []
    (data_dir / "cnndm/stories").mkdir(exist_ok=True)
    for url in tqdm(urls[:cnndm_n or None], desc="cnndm stories"):
        dailymail = any(s in url for s in ("dailymail.co.uk", "mailonsunday.ie", "lib.store.yahoo.net"))
        doc_id, site = hashlib.sha1(url.encode()).hexdigest(), "dailymail" if dailymail else "cnn"  # as OpenAI's code
        dest = data_dir / "cnndm/stories" / f"{doc_id}.story"
        if not dest.exists():
            os.replace(_fetch(f"{base_url}datasets/cnndm/cache_test/{site}/stories/{doc_id}.story", dest, timeout,
                              progress=False), dest)
        article, reference = parse_story(dest.read_text(encoding="utf-8"))
        records.append(dict(article=article, reference=reference, id=doc_id, site=site, title=titles.get(doc_id)))
    write_jsonl(data_dir / TASKS["tldr"]["files"]["transfer"], records)
    print(f"data: all files in {data_dir}")


def parse_story(text):
    """A DMQA .story file -> (article, reference), following the processing of OpenAI's cnndm.py as FORMATS.md
    section 4 describes it, without ftfy's text repair (not a dependency here); the Daily Mail header pattern is
    our approximation of theirs."""
    lines = [line.strip() for line in text.replace("\xa0", " ").split("\n")]
    cut = lines.index("@highlight") if "@highlight" in lines else len(lines)
    article = "\n\n".join(line for line in lines[:cut] if line)
    article = re.sub(r"^\(CNN\)\s*(--)?\s*", "", article)
    article = re.sub(r"^.{0,300}?UPDATED:[\s.]*\d\d:\d\d \w+, \d+ \w+ \d{4}[\s.]*", "", article, flags=re.S)
    article = article.replace("\u2019", "'").replace("\u2018", "'").strip()
    highlights = []
    for line in lines[cut:]:
        line = line.replace("NEW: ", "")
        if not line or line == "@highlight" or line.startswith(("READ: ", "for all the latest ")):
            continue
        line = re.split(r"CLICK HERE|Click here|click here", line)[0].strip()
        if line and not line.endswith((".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")):
            line += "."  # fix_missing_period
        if line:
            highlights.append(line)
    return article, " ".join(highlights)


# ----------------------------------------------------------------------------------------------------------------
# the synthetic TL;DR: a small closed world of facts, a poster who writes flawed TL;DRs, a gold labeler that knows
# the facts, and noisy simulated labelers. Everything is ASCII and free of apostrophes, so each word is one token.
# Editing these tables changes the world: bump WORLD (and SYNTH_TOKENIZER if the set of words changes).

WORLD = "synth1"

SUBREDDITS = {"relationships": ["boyfriend", "girlfriend", "husband", "wife"],
              "dating_advice": ["boyfriend", "girlfriend"],
              "relationship_advice": ["best friend", "roommate", "boyfriend", "girlfriend"],
              "Advice": ["mom", "dad", "sister", "brother", "roommate"]}
TRANSFER_SUBREDDITS = {"jobs": ["boss", "coworker", "manager"]}  # never in train/valid/test, nor its problems
GENDER = dict(boyfriend="M", husband="M", dad="M", brother="M", girlfriend="F", wife="F", mom="F", sister="F")
PARTNERS = {"boyfriend", "girlfriend", "husband", "wife"}
PRONOUNS = dict(M=dict(he="he", him="him", his="his"), F=dict(he="she", him="her", his="her"))
# A problem is what the other person does to the poster, with the same act with the roles reversed ("swap_roles",
# the perturbation of the paper's Section 4.3). Every problem is one-sided so that the swap is a false statement.
PROBLEMS = [
    ("keeps reading my texts", "keep reading {his} texts"), ("owes me money", "owe {him} money"),
    ("borrows my car without asking", "borrow {his} car without asking"), ("yells at me a lot", "yell at {him} a lot"),
    ("ignores my messages", "ignore {his} messages"), ("told my secret to everyone", "told {his} secret to everyone"),
    ("blames me for everything", "blame {him} for everything"), ("eats my food", "eat {his} food"),
    ("makes fun of my job", "make fun of {his} job"), ("talks over me", "talk over {him}")]
PARTNER_PROBLEMS = [
    ("cheated on me", "cheated on {him}"), ("forgot my birthday", "forgot {his} birthday"),
    ("invited my ex to dinner", "invited {his} ex to dinner"), ("lied to me about money", "lied to {him} about money")]
TRANSFER_PROBLEMS = [
    ("takes credit for my work", "take credit for {his} work"), ("reads my emails", "read {his} emails"),
    ("gives me all the late shifts", "give {him} all the late shifts"),
    ("yells at me in meetings", "yell at {him} in meetings")]
QUESTIONS = ["what should I do", "how do I get {him} to stop", "am I overreacting", "should I confront {him}",
             "how do I talk to {him} about it", "is this normal"]
TRANSFER_QUESTIONS = ["should I quit", "should I talk to HR"]
DETAILS = ["I work at a bakery", "I just started college", "we have two cats", "I play guitar in a band",
           "we live in a small town", "I am saving for a car", "my favorite food is pizza", "I go to the gym a lot",
           "we met at a concert", "it snowed a lot this winter", "I have a dog named Max", "I love hiking"]
UNITS = ["weeks", "months", "years"]
INTROS = ["I ({a1} {g1}) have known my {rel} ({a2} {g2}) for {dur}.",
          "My {rel} ({a2} {g2}) and I ({a1} {g1}) have been close for {dur}."]
PROBLEM_LINES = ["Lately {he} {vp}.", "The problem is that {he} {vp}.", "Recently {he} {vp}."]
FEELINGS = ["It really hurts.", "I feel awful about it.", "It is driving me crazy.", "I feel lost."]
TITLES = ["Need advice about my {rel}", "My {rel} {vp}", "{Q}?", "Not sure what to do"]
# How the simulated poster writes a TL;DR. The main sentence comes in a short and a long form, with or without the
# duration; {act} is "{he} {vp}" or, with roles swapped, "I {swap}". "bare" leaves out who the other person is.
MAIN_FORMS = {("short", True): "My {rel} of {dur} {vp}.", ("short", False): "My {rel} {vp}.",
              ("long", True): "I have known my {rel} for {dur} and {act}.",
              ("long", False): "Me and my {rel} are close but {act}.", ("bare", False): "{Act}."}
# The poster's habits (probabilities). Most references leave out the duration or the question, some add an
# irrelevant detail, a few state something false: beatable, like the paper's references, and a supervised policy
# that imitates them at temperature 0 inherits the omissions, which is the room left for RL (Section 4.1).
POSTER = dict(duration=0.3, question=0.3, bare=0.12, long=0.3, detail=0.35, wrong=0.15)
# Gold rubric (see gold_score). Coverage weights sum to 1; BUDGET is the synthetic analogue of the 48-token limit.
COVER = dict(rel=0.2, vp=0.4, dur=0.2, q=0.2)
DETAIL_COST, FALSE_COST, INCOHERENCE_COST, BUDGET = 0.1, 0.5, 0.25, 28
LABELER_NOISE = 0.044  # Bradley-Terry temperature on gold totals; calibrated for ~75% labeler-labeler agreement


def _words(text):
    return [p.strip() for p in PAT_ASCII.findall(text) if p.strip()]


def _key(text):
    return tuple(w.lower() for w in _words(text))


def _cap(s):
    return s[:1].upper() + s[1:]


def _world_words():
    """Every word the world can write, capitalized or not: the vocabulary of the synthetic tokenizer. It depends only
    on the tables above, never on a seed, so the tokenizer name always rebuilds the same encoding."""
    texts = list(SUBREDDITS) + list(TRANSFER_SUBREDDITS) + sum(SUBREDDITS.values(), [])
    texts += sum(TRANSFER_SUBREDDITS.values(), []) + sum(map(list, PROBLEMS + PARTNER_PROBLEMS + TRANSFER_PROBLEMS), [])
    texts += QUESTIONS + TRANSFER_QUESTIONS + DETAILS + UNITS + INTROS + PROBLEM_LINES + FEELINGS + TITLES
    texts += list(MAIN_FORMS.values()) + [TEMPLATES["tldr"][0], "I he she him his her M F ? . \n"]
    texts += [str(n) for n in range(100)]
    words = {w for t in texts for w in _words(re.sub(r"\{\w+\}", " ", t))}
    return {v for w in words for v in (w, _cap(w), w[:1].lower() + w[1:])}


@functools.lru_cache(maxsize=65536)
def _synth_world(record_id):
    """Regenerate a synthetic record and its hidden facts from its id "{WORLD}_{seed}_{split}_{index}". The record is
    a pure function of the id, so the gold labeler needs nothing but the record as read back from a file."""
    parts = str(record_id).split("_")
    if len(parts) != 4 or parts[0] != WORLD or parts[2] not in TASKS["synth"]["files"]:
        raise DataError(f"{record_id!r} is not a synthetic record id ({WORLD}_<seed>_<split>_<index>)")
    rng, transfer = random.Random(record_id), parts[2] == "transfer"  # a str seed is hashed: same on every machine
    subs = TRANSFER_SUBREDDITS if transfer else SUBREDDITS
    subreddit = rng.choice(sorted(subs))
    rel = rng.choice(subs[subreddit])
    g2 = GENDER.get(rel) or rng.choice("MF")
    p = PRONOUNS[g2]
    a1, g1 = rng.randint(18, 35), rng.choice("MF")
    a2 = a1 + (rng.randint(20, 30) if rel in ("mom", "dad") else rng.randint(-4, 6))
    pool = TRANSFER_PROBLEMS if transfer else PROBLEMS + (PARTNER_PROBLEMS if rel in PARTNERS else [])
    vp, swap = rng.choice(pool)
    q = rng.choice(QUESTIONS + (TRANSFER_QUESTIONS if transfer else []))
    f = dict(rel=rel, he=p["he"], vp=vp, swap="I " + swap.format(**p), dur=f"{rng.randint(2, 11)} {rng.choice(UNITS)}",
             q_id=q, q=q.format(**p), details=rng.sample(DETAILS, 2))
    slots = dict(a1=a1, g1=g1, a2=a2, g2=g2, rel=rel, dur=f["dur"], he=p["he"], vp=vp, Q=_cap(f["q"]))
    first = rng.choice(INTROS).format(**slots) + " " + _cap(f["details"][0]) + "."
    second = [rng.choice(PROBLEM_LINES).format(**slots), _cap(f["details"][1]) + "."]
    second += [rng.choice(FEELINGS)] if rng.random() < 0.6 else []
    paragraphs = [first, " ".join(second), _cap(f["q"]) + "?"]
    post = "\n\n".join(paragraphs) if rng.random() < 0.7 else " ".join(paragraphs)
    record = dict(id=record_id, subreddit=subreddit, title=rng.choice(TITLES).format(**slots), post=post,
                  summary=_render(f, _poster_plan(f, rng)))
    return record, f


def synth_record(seed, split, index):
    """The synthetic record (tldr_3_filtered fields) number `index` of a split: train/valid/test/transfer."""
    return dict(_synth_world(f"{WORLD}_{seed}_{split}_{index}")[0])


def _facts(record):
    world, facts = _synth_world(record.get("id"))
    if world["post"] != record.get("post"):
        raise DataError(f"record {record.get('id')}: its post differs from the synthetic world's (another version?)")
    return facts


def _poster_plan(f, rng):
    """What the simulated poster puts in a TL;DR (see POSTER)."""
    plan = dict(dur=rng.random() < POSTER["duration"], q=rng.random() < POSTER["question"], details=[],
                swap=False, wrong_dur=None)
    plan["form"] = "bare" if not plan["dur"] and rng.random() < POSTER["bare"] else (
        "long" if rng.random() < POSTER["long"] else "short")
    if rng.random() < POSTER["detail"]:
        plan["details"].append(rng.choice(f["details"]))
    if rng.random() < POSTER["wrong"]:
        _add_false_fact(f, plan, rng)
    return plan


def _add_false_fact(f, plan, rng):
    kind = rng.choice(["dur", "swap", "detail"])
    if kind == "dur":  # a misremembered number, often the kind of slip a small model makes too
        n, unit = f["dur"].split()
        plan.update(dur=True, form="short" if plan["form"] == "bare" else plan["form"],
                    wrong_dur=f"{int(n) + rng.choice([-1, 1, 2])} {unit}")
    elif kind == "swap":
        plan.update(swap=True, form="long")
    else:
        plan["details"] = [rng.choice([d for d in DETAILS if d not in f["details"]])]


def _render(f, plan):
    act = f["swap"] if plan["swap"] else f"{f['he']} {f['vp']}"
    main = MAIN_FORMS[(plan["form"], plan["dur"] and plan["form"] != "bare")]
    text = main.format(rel=f["rel"], dur=plan["wrong_dur"] or f["dur"], vp=f["vp"], act=act, Act=_cap(act))
    text += "".join(f" {_cap(d)}." for d in plan["details"])
    return text + (f" {_cap(f['q'])}?" if plan["q"] else "")


def sample_reference(record, rng):
    """A fresh TL;DR of a synthetic record by the simulated poster (`rng`: random.Random), flaws and all."""
    f = _facts(record)
    return _render(f, _poster_plan(f, rng))


def perfect_summary(record):
    """Every key fact, nothing else, in the short form: what the gold labeler likes best."""
    return _render(_facts(record), dict(form="short", dur=True, q=True, details=[], swap=False, wrong_dur=None))


PERTURBATIONS = ("drop_fact", "add_false_fact", "swap_roles", "add_detail", "shorter", "longer")


def perturb_summary(record, kind, rng=None):
    """The record's perfect summary changed in one way, for probing what a reward model has learned (the paper's
    Section 4.3): drop_fact (one key fact left out), add_false_fact (a wrong number, a detail not in the post, or
    the roles swapped), swap_roles, add_detail (an irrelevant true detail), shorter (only who and the problem),
    longer (the same facts in the long form: the gold labeler is indifferent, a length-biased model is not)."""
    rng = rng or random.Random(0)
    f = _facts(record)
    plan = dict(form="short", dur=True, q=True, details=[], swap=False, wrong_dur=None)
    if kind == "drop_fact":
        plan.update(rng.choice([dict(dur=False), dict(q=False), dict(form="bare", dur=False)]))
    elif kind == "add_false_fact":
        _add_false_fact(f, plan, rng)
    elif kind == "swap_roles":
        plan.update(swap=True, form="long")
    elif kind == "add_detail":
        plan["details"] = [rng.choice(f["details"])]
    elif kind == "shorter":
        plan.update(dur=False, q=False)
    elif kind == "longer":
        plan["form"] = "long"
    else:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    return _render(f, plan)


@functools.lru_cache(maxsize=None)
def _lexicon():
    """Phrase -> (kind, value) for everything the world can state, and the word-class bigrams that well-formed
    summaries contain. Parsing a summary is a longest-match over these phrases; what is left over is junk."""
    lex = {}
    for rel in sum(SUBREDDITS.values(), []) + sum(TRANSFER_SUBREDDITS.values(), []):
        lex[_key(rel)] = ("rel", rel)
    for n in range(1, 100):
        for unit in UNITS:
            lex[(str(n), unit)] = ("dur", f"{n} {unit}")
    for vp, swap in PROBLEMS + PARTNER_PROBLEMS + TRANSFER_PROBLEMS:
        lex[_key(vp)] = ("vp", vp)
        for p in PRONOUNS.values():
            lex[_key("I " + swap.format(**p))] = ("swap", vp)
    for q in QUESTIONS + TRANSFER_QUESTIONS:  # either pronoun covers the question: pronouns are not graded
        for p in PRONOUNS.values():
            lex[_key(q.format(**p))] = ("q", q)
    for d in DETAILS:
        lex[_key(d)] = ("detail", d)
    sentences = [["DETAIL", "."], ["Q", "?"]]
    for form in MAIN_FORMS.values():
        for act in ("he {vp}", "{swap}"):
            s = form.replace("{Act}", "{act}").replace("{act}", act).lower()
            sentences.append(_words(re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), s)))
    literals = {w for s in sentences for w in s if not w.isupper()} | {"she"}
    lex.update({(w,): ("lit", w) for w in literals if (w,) not in lex})
    bigrams = {pair for s in sentences for pair in zip(["<s>"] + s, s + ["</s>"])}
    bigrams |= {(s[-1], t[0]) for s in sentences for t in sentences}
    return lex, max(map(len, lex)), bigrams


def _parse(text):
    lex, longest, _ = _lexicon()
    words, units, i = list(_key(text)), [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            if tuple(words[i:i + n]) in lex:
                units.append(lex[tuple(words[i:i + n])])
                i += n
                break
        else:
            units.append(("junk", words[i]))
            i += 1
    return units


def gold_score(record, summary):
    """The synthetic task's ground truth: a documented rubric on the paper's axes (Section 4.1), each in [0, 1].
      coverage  = 0.2 who (the relation) + 0.4 the problem + 0.2 how long + 0.2 the question asked,
                  minus 0.1 for each irrelevant detail of the post (it spends the reader's attention)
      accuracy  = 1 - 0.5 per distinct false statement (wrong person, number, problem, question, a detail not in the
                  post, or the roles swapped)
      coherence = 1 - 0.25 per word pair that no well-formed summary contains (junk words, broken or unfinished
                  sentences) - 0.25 per repeated fact; 0 when nothing is stated
      length    = 1 - (words over BUDGET) / BUDGET, at least 0
      total     = (2 coverage + 2 accuracy + coherence + length) / 6
    Stuffing facts, repeating them, copying the post or emitting junk all score below a concise, complete summary."""
    f = _facts(record)
    units = _parse(summary)
    claims = Counter(u for u in units if u[0] not in ("lit", "junk"))
    truth = dict(rel=f["rel"], vp=f["vp"], dur=f["dur"], q=f["q_id"])
    coverage = sum(w for kind, w in COVER.items() if (kind, truth[kind]) in claims)
    coverage -= DETAIL_COST * sum(1 for kind, v in claims if kind == "detail" and v in f["details"])
    false = sum(1 for kind, v in claims if kind == "swap" or (kind == "detail" and v not in f["details"])
                or (kind in truth and v != truth[kind]))
    _, _, bigrams = _lexicon()
    classes = ["<s>"] + [("he" if v == "she" else v) if k == "lit" else "#" if k == "junk" else k.upper()
                         for k, v in units] + ["</s>"]
    bad = sum(pair not in bigrams for pair in zip(classes, classes[1:]))
    repeats = sum(c - 1 for c in claims.values())
    coherence = max(0.0, 1 - INCOHERENCE_COST * (bad + repeats)) if claims else 0.0
    length = max(0.0, 1 - max(0, len(_words(summary)) - BUDGET) / BUDGET)
    scores = dict(coverage=max(0.0, coverage), accuracy=max(0.0, 1 - FALSE_COST * false), coherence=coherence,
                  length=length)
    return dict(total=(2 * scores["coverage"] + 2 * scores["accuracy"] + coherence + length) / 6, **scores)


def gold_win_rate(records, summaries, baselines=None):
    """How often the gold labeler prefers `summaries` to the references (or `baselines`); a tie counts a half."""
    wins = []
    for i, rec in enumerate(records):
        a = gold_score(rec, summaries[i])["total"]
        b = gold_score(rec, baselines[i] if baselines else rec["summary"])["total"]
        wins.append(1.0 if a > b + 1e-9 else 0.5 if abs(a - b) <= 1e-9 else 0.0)
    return float(np.mean(wins))


class Labeler:
    """A simulated labeler: prefers summary 0 with probability sigmoid((gold0 - gold1) / noise) (Bradley-Terry), so
    clear differences are judged reliably and close calls are nearly coin flips, as with the paper's labelers."""

    def __init__(self, worker, noise=LABELER_NOISE, seed=0):
        self.worker, self.noise, self.rng = worker, noise, np.random.default_rng(seed)

    def compare(self, record, text0, text1):
        """-> (choice, confidence): confidence on the released data's 9-point scale, 1-4 = summary 0 preferred
        (1 surest), 6-9 = summary 1 (9 surest); 5 is never used. A choice against the odds comes with low confidence."""
        diff = gold_score(record, text0)["total"] - gold_score(record, text1)["total"]
        p0 = 1 / (1 + math.exp(-diff / self.noise))
        choice = int(self.rng.random() >= p0)
        sure = 2 * (p0 if choice == 0 else 1 - p0) - 1
        strength = int(np.clip(round(1 + 3 * sure + self.rng.normal(0, 0.6)), 1, 4))
        return choice, 5 - strength if choice == 0 else 5 + strength


def make_labelers(n, seed=0, noise=LABELER_NOISE):
    """`n` labelers with 30-character pseudonymous worker ids, like the released data, each a little more or less
    careful than `noise`."""
    rng = random.Random(f"labelers_{seed}")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return [Labeler("".join(rng.choice(alphabet) for _ in range(30)), noise * rng.uniform(0.9, 1.1),
                    seed=rng.getrandbits(32)) for _ in range(n)]


def labeler_agreement(records, labelers, rng, pairs=4000):
    """How often two different labelers choose the same summary, on typical pairs: two different TL;DRs the poster
    could have written for the same post. The paper: 73% between researchers, 77% labeler-researcher (Section 3.3)."""
    same = []
    for i in range(pairs):
        rec = records[i % len(records)]
        a, b = sample_reference(rec, rng), sample_reference(rec, rng)
        if a != b:
            x, y = rng.sample(labelers, 2)
            same.append(x.compare(rec, a, b)[0] == y.compare(rec, a, b)[0])
    return float(np.mean(same))


def collect_comparisons(records, summaries_by_policy, labelers, rng, include_ref=True, pairs_per_record=1,
                        split="train", batch="synth0"):
    """The paper's step 1 (Section 3.1): for each record, pair two summaries of different policies (the reference
    counts as policy "ref"), show them in random order to a random labeler, and record the choice. Returns comparison
    dicts in the original format and key order; write them with `write_jsonl`. `rng` is a numpy Generator. A human
    labeler would be any object with `.worker` and `.compare(record, text0, text1) -> (choice, confidence)`."""
    out = []
    for i, rec in enumerate(records):
        cands = [(policy, texts[i]) for policy, texts in summaries_by_policy.items()]
        cands += [("ref", rec["summary"])] if include_ref else []
        if len(cands) < 2:
            raise ValueError("need at least two policies to compare (or include_ref=True)")
        for _ in range(pairs_per_record):
            (p0, t0), (p1, t1) = [cands[j] for j in rng.choice(len(cands), size=2, replace=False)]
            labeler = labelers[int(rng.integers(len(labelers)))]
            t0, t1 = as_response(t0), as_response(t1)
            choice, confidence = labeler.compare(rec, t0, t1)
            out.append(dict(info=dict(id=rec["id"], post=rec["post"], title=rec["title"], subreddit=rec["subreddit"]),
                            split=split, summaries=[dict(text=t0, policy=p0, note=None),
                                                    dict(text=t1, policy=p1, note=None)],
                            choice=choice, worker=labeler.worker, batch=batch, extra=dict(confidence=confidence)))
    return out


def write_synth(out_dir, seed=0, sizes=None, n_labelers=10):
    """Write the synthetic splits in the tldr_3_filtered format and a synth.json with the world's statistics."""
    sizes = sizes or dict(train=20000, valid=1000, test=1000, transfer=1000)
    out_dir, stats = Path(out_dir), dict(seed=seed, world=WORLD, tokenizer=SYNTH_TOKENIZER, sizes=sizes)
    splits = {s: [synth_record(seed, s, i) for i in range(n)] for s, n in sizes.items()}
    for split, records in splits.items():
        write_jsonl(out_dir / TASKS["synth"]["files"][split], records)
    enc, valid = get_tokenizer(SYNTH_TOKENIZER), splits["valid"] or splits["train"]
    q_lens = [len(enc.encode_ordinary(format_query(r, enc, 10**9))) for r in valid]
    s_lens = [len(_encode_responses([r["summary"]], enc)[0]) for r in valid]
    labelers = make_labelers(n_labelers, seed)
    stats.update(vocab=enc.n_vocab, query_tokens=[int(np.mean(q_lens)), max(q_lens)],
                 response_tokens=[int(np.mean(s_lens)), max(s_lens)],
                 gold_reference=round(float(np.mean([gold_score(r, r["summary"])["total"] for r in valid])), 4),
                 gold_perfect=round(float(np.mean([gold_score(r, perfect_summary(r))["total"] for r in valid])), 4),
                 perfect_vs_reference=round(gold_win_rate(valid, [perfect_summary(r) for r in valid]), 4),
                 labelers=[x.worker for x in labelers],
                 agreement=round(labeler_agreement(valid, labelers, random.Random(seed)), 4))
    _write_atomic(out_dir / "synth.json", json.dumps(stats, indent=1) + "\n")
    return stats


# ----------------------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch OpenAI's TL;DR, comparisons, axis evals and CNN/DM test articles")
    dl.add_argument("--data-dir", default=TASKS["tldr"]["data_dir"], help="where to put the files")
    dl.add_argument("--base-url", default=BASE_URL, help="mirror of OpenAI's summarize-from-feedback blob")
    dl.add_argument("--cnndm-n", type=int, default=1000, help="CNN/DM test articles for transfer (0 = all 11,490)")
    dl.add_argument("--timeout", type=float, default=10.0, help="seconds before a connection attempt fails")
    sy = sub.add_parser("synth", help="generate the synthetic TL;DR and measure the simulated labelers")
    sy.add_argument("--out-dir", default=TASKS["synth"]["data_dir"], help="where to write the splits")
    sy.add_argument("--seed", type=int, default=0, help="world seed (the tokenizer does not depend on it)")
    sy.add_argument("--n-train", type=int, default=20000, help="training posts")
    sy.add_argument("--n-valid", type=int, default=1000, help="validation posts")
    sy.add_argument("--n-test", type=int, default=1000, help="test posts")
    sy.add_argument("--n-transfer", type=int, default=1000, help="posts from the held-out subreddit and problems")
    sy.add_argument("--labelers", type=int, default=10, help="simulated labelers")
    args = parser.parse_args()
    if args.command == "download":
        download(args.data_dir, args.base_url, args.cnndm_n, args.timeout)
        return
    t0 = time.time()
    stats = write_synth(args.out_dir, args.seed, dict(train=args.n_train, valid=args.n_valid, test=args.n_test,
                                                      transfer=args.n_transfer), args.labelers)
    print(f"synth: wrote {args.out_dir} in {time.time() - t0:.1f}s | tokenizer {SYNTH_TOKENIZER} vocab {stats['vocab']}"
          f" | query tokens mean/max {stats['query_tokens']} | reference tokens {stats['response_tokens']}"
          f" | gold: reference {stats['gold_reference']:.3f}, perfect {stats['gold_perfect']:.3f}")
    print(f"synth: labeler-labeler agreement {stats['agreement']:.1%} (paper: 73-77%) | gold prefers a perfect summary "
          f"to the reference {stats['perfect_vs_reference']:.1%} of the time")


if __name__ == "__main__":
    main()
