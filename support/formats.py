"""The formats of OpenAI's released files, read and written: the filtered TL;DR posts, the comparisons, the axis
evaluations and the processed CNN/DM articles. Each reader returns plain dicts, names the file and line of a bad
record, and is named in its docstring with the fields it reads. data.py hands them to the stages."""
import json
import sys
from pathlib import Path

from support.files import atomic_write


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line) to look at."""


# What the readers and the synthetic tokenizer need of the synthetic world, which lives in synth.py: the words of its
# tokenizer and the check of a post. synth.py hands them over when imported (`register_synthetic_world`), so neither
# data.py nor this module imports synth.py.
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
        doc.update(post=_get(info, "post"), title=_get(info, "title"),
                   subreddit=subreddit_name(_get(info, "subreddit")))
        if not doc["post"].strip():
            raise DataError("empty post")
    return doc


def subreddit_name(name):
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
        rec = dict(rec, subreddit=subreddit_name(rec["subreddit"]))
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
