"""Tests of data.py: the readers on OpenAI's real files, the query, the cache, decoding and ROUGE, the download.

The real sample files live outside the repository (they are never copied here; tests/locations.py says where);
tests that need them, or the GPT-2 BPE, are skipped with a reason when they are absent.
"""
import functools
import hashlib
import http.server
import io
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
from locations import SAMPLE  # noqa: E402
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import synth  # noqa: E402  (synthetic records as test inputs)
from support import openai_data  # noqa: E402

needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real sample files not found at {SAMPLE}")


@pytest.fixture(scope="module")
def gpt2():
    try:
        return data.get_tokenizer("gpt2")
    except data.DataError as e:
        pytest.skip(f"GPT-2 BPE unavailable offline: {e}")


@pytest.fixture(scope="module")
def synth_enc():
    return data.get_tokenizer(data.SYNTH_TOKENIZER)


# ---------------------------------------------------------------------------------------------------- real files

@needs_sample
def test_batch18_counts():
    rows = data.read_comparisons(SAMPLE / "comparisons/batch18.json")
    assert len(rows) == 674
    assert Counter(r["split"] for r in rows) == {"valid2": 554, "valid1": 120}
    assert len({r["id"] for r in rows}) == 110
    assert Counter(p for r in rows for p in r["policies"]) == {
        "ref": 339, "sup4_6b_p.95": 305, "sup4_6b_t0.7": 305, "sup4_6b": 305, "sup4_6b_t1": 30, "sup4_6b_t.5": 29,
        "sup4_6b_t.3": 29, "sup4_6b_p.8": 3, "sup4_6b_p.7": 2, "sup4_6b_p.9": 1}
    assert Counter(r["choice"] for r in rows) == {0: 350, 1: 324}
    assert all(not r["is_cnndm"] and r["article"] is None and r["batch"] == "batch18" for r in rows)
    # the 9-point confidence: 1-4 means summary 0 was preferred, 6-9 summary 1
    assert all((r["confidence"] < 5) == (r["choice"] == 0) and r["confidence"] != 5 for r in rows)
    assert all(t.startswith(" ") and not t.startswith("  ") for r in rows for t in r["summaries"])


@needs_sample
def test_cnndm0_counts_and_quirks():
    rows = data.read_comparisons(SAMPLE / "comparisons/cnndm0.json")
    assert len(rows) == 437 and {r["split"] for r in rows} == {"valid2"}
    assert all(r["is_cnndm"] and r["post"] is None and r["site"] in ("cnn", "dailymail") for r in rows)
    assert len({r["id"] for r in rows}) == 45
    assert Counter(p for r in rows for p in r["policies"]) == {
        "ref": 221, "sup4_6b_ppo_rm4_6b_kl14": 220, "pretrain_6b_t.7": 217, "sup4_6b_t0.7": 216}
    empty = [p for r in rows for p, t in zip(r["policies"], r["summaries"]) if t == " "]
    assert empty == ["pretrain_6b_t.7"] * 12
    assert not any(t.startswith((" \xa0", "\xa0", "  ")) for r in rows for t in r["summaries"])


@needs_sample
def test_edit_batch_quirks(gpt2):
    rows = data.read_comparisons(SAMPLE / "comparisons/edit_b2_eval_test.json")
    assert len(rows) == 5 and Counter(r["split"] for r in rows) == {"valid2": 4, "valid1": 1}
    assert all(r["id"] is None and not r["subreddit"].startswith("r/") for r in rows)
    assert all(t[0] == " " and t[1] != " " for r in rows for t in r["summaries"])  # no leading space in the file
    assert Counter(p for r in rows for p in r["policies"])["human_editor"] == 5
    query = data.format_query(rows[0], gpt2, 512)
    assert query.startswith("SUBREDDIT: r/relationships\n\nTITLE: ") and "r/r/" not in query


@needs_sample
def test_documented_examples():
    rows = data.read_comparisons(SAMPLE / "from_docs/comparisons_train_examples_from_docs.jsonl")
    assert [(r["split"], r["batch"], r["confidence"]) for r in rows] == [("train", "batch9", 8),
                                                                         ("train", "batch5", None)]
    tldr = data.read_tldr(SAMPLE / "from_docs/tldr_3_filtered_train_example_from_docs.jsonl")
    assert [r["id"] for r in tldr] == ["t3_1hxu8s"] and tldr[0]["subreddit"] == "relationships"
    assert len(data.read_tldr(SAMPLE / "derived/tldr_3_filtered_format_from_batch18_refs.jsonl")) == 110
    axis = data.read_axis_evals(SAMPLE / "from_docs/axis_evals_example_from_readme.jsonl")
    assert len(axis) == 1 and axis[0]["is_cnndm"] and axis[0]["split"] == "test" and axis[0]["batch"] == "cnndm1"
    assert axis[0]["axes"] == dict(overall=3, accuracy=5, coverage=4, coherence=2, compatible=None)
    cnndm = data.read_cnndm(SAMPLE / "derived/cnndm_val_articles_from_cnndm0.jsonl")
    assert len(cnndm) == 45 and all(len(r["id"]) == 40 and r["article"] and r["summary"] for r in cnndm)


@needs_sample
def test_duplicate_batches_are_read_once(tmp_path):
    # batch0_cnndm.json is cnndm0.json with another batch name; build such a copy in a temporary folder
    lines = (SAMPLE / "comparisons/cnndm0.json").read_text().splitlines()
    copy = [json.dumps(dict(json.loads(line), batch="batch0_cnndm")) for line in lines]
    (tmp_path / "batch0_cnndm.json").write_text("\n".join(copy) + "\n")
    rows = data.read_comparisons([SAMPLE / "comparisons/cnndm0.json", tmp_path / "batch0_cnndm.json",
                                  SAMPLE / "comparisons/edit_b2_eval_test.json"])
    assert len(rows) == 437 + 5 and Counter(r["batch"] for r in rows)["cnndm0"] == 437


@needs_sample
def test_writer_is_byte_exact(tmp_path):
    for name in ("edit_b2_eval_test.json", "cnndm0.json"):
        original = (SAMPLE / "comparisons" / name).read_bytes()
        data.write_jsonl(tmp_path / name, [json.loads(line) for line in original.split(b"\n") if line])
        assert (tmp_path / name).read_bytes() == original


# ------------------------------------------------------------------------------------------------ queries, cache

def test_query_of_a_known_record(gpt2):
    rec = dict(id="x", subreddit="r/tifu", title="A title", post="Line one.\nLine two.", summary="s")
    expected = "SUBREDDIT: r/tifu\n\nTITLE: A title\n\nPOST: Line one.\nLine two.\n\nTL;DR:"
    assert data.format_query(rec, gpt2, 512) == expected
    assert data.format_query(dict(article="Body.", id="y"), gpt2, 512) == "Body.\n\nTL;DR:"


@needs_sample
def test_truncation_cuts_at_newlines(gpt2):
    records = data.read_tldr(SAMPLE / "derived/tldr_3_filtered_format_from_batch18_refs.jsonl")
    records += [dict(r, post="\n".join([r["post"]] * 3)) for r in records[:20]]  # some longer than 512 tokens
    cuts = Counter()
    for limit in (512, 160):
        for rec in records:
            query = data.format_query(rec, gpt2, limit)
            assert len(gpt2.encode_ordinary(query)) <= limit and query.endswith("\n\nTL;DR:")
            kept = query[query.index("\n\nPOST: ") + 8:-len("\n\nTL;DR:")]
            assert rec["post"].startswith(kept)
            if kept == rec["post"]:
                continue
            if rec["post"][len(kept)] == "\n":  # cut at a newline, and no later newline would have fitted
                cuts["newline"] += 1
                nxt = rec["post"].find("\n", len(kept) + 1)
                longer = rec["post"][:nxt] if nxt >= 0 else rec["post"]
            else:  # no newline left: cut one character at a time
                cuts["character"] += 1
                assert "\n" not in kept
                longer = rec["post"][:len(kept) + 1]
            assert len(gpt2.encode_ordinary(data.format_query(dict(rec, post=longer), gpt2, 10**9))) > limit
    assert cuts["newline"] > 20 and cuts["character"] > 20


def test_truncation_without_newline_drops_characters(gpt2):
    rec = dict(subreddit="x", title="t", post="word " * 300)
    query = data.format_query(rec, gpt2, 64)
    assert len(gpt2.encode_ordinary(query)) <= 64
    kept = query[query.index("POST: ") + 6:-len("\n\nTL;DR:")]
    one_more = dict(rec, post=rec["post"][:len(kept) + 1])
    assert len(gpt2.encode_ordinary(data.format_query(one_more, gpt2, 10**9))) > 64
    with pytest.raises(data.DataError, match="even with an empty post"):
        data.format_query(dict(rec, title="long " * 100), gpt2, 64)


def test_a_long_line_is_cut_in_a_few_encodes(gpt2):
    # A 100k-character post without newlines once took 19 minutes: one encode per dropped character. The cut is
    # bisected now: the same place (the longest prefix that fits) in a few dozen encodes.
    class Counting:
        def __init__(self, enc):
            self.enc, self.calls = enc, 0

        def encode_ordinary(self, text):
            self.calls += 1
            return self.enc.encode_ordinary(text)

    rec = dict(subreddit="x", title="t", post=" ".join(f"word{i % 97}" for i in range(20_000)))  # ~140k characters
    enc = Counting(gpt2)
    query = data.format_query(rec, enc, 512)
    assert enc.calls < 60
    kept = query[query.index("POST: ") + 6:-len("\n\nTL;DR:")]
    assert len(gpt2.encode_ordinary(query)) <= 512 and rec["post"].startswith(kept)
    one_more = data.format_query(dict(rec, post=rec["post"][:len(kept) + 1]), gpt2, 10**9)
    assert len(gpt2.encode_ordinary(one_more)) > 512


def test_gpt2_tokenizer(gpt2):
    assert gpt2.name == "r50k_base" and gpt2.n_vocab == 50257 and gpt2.eot_token == 50256
    assert data.pad_id(gpt2) == 50257 and data.get_tokenizer(data.TASKS["tldr"]["tokenizer"]) is gpt2


def test_prepare_sft_and_cache(tmp_path, synth_enc, monkeypatch):
    records = [synth.synth_record(0, "train", i) for i in range(64)]
    records.append(dict(records[0], id="long", summary="word " * 40))  # a reference too long for 32 tokens
    arrays = data.prepare_sft(records, synth_enc, 96, 32, cache_dir=tmp_path)
    assert arrays["query"].shape == (64, 96) and arrays["response"].shape == (64, 32)
    assert arrays["query"].dtype == np.int32 and list(arrays["index"]) == list(range(64))
    pad = data.pad_id(synth_enc)
    q, r = arrays["query"][0], arrays["response"][0]
    n = int((q != pad).sum())
    assert (q[:-n] == pad).all() and synth_enc.decode(list(q[-n:])) == data.format_query(records[0], synth_enc, 96)
    m = int((r != pad).sum())
    assert (r[m:] == pad).all() and r[m - 1] == synth_enc.eot_token
    assert synth_enc.decode(list(r[:m - 1])) == " " + records[0]["summary"]
    meta = json.loads(next(tmp_path.glob("sft-*.json")).read_text())
    assert meta["dropped_long"] == 1 and meta["rows"] == 64
    # a second call is a cache hit: nothing is tokenized
    monkeypatch.setattr(data, "_encode_queries", lambda *a: pytest.fail("cache not used"))
    again = data.prepare_sft(records, synth_enc, 96, 32, cache_dir=tmp_path)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    monkeypatch.undo()
    # new lengths or new records: a new cache entry
    data.prepare_sft(records, synth_enc, 80, 32, cache_dir=tmp_path)
    data.prepare_sft(records[:10], synth_enc, 96, 32, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("sft-*.npz"))) == 3 and not list(tmp_path.glob("*.tmp"))


@needs_sample
def test_prepare_comparisons(gpt2, tmp_path):
    rows = data.read_comparisons([SAMPLE / "comparisons/edit_b2_eval_test.json", SAMPLE / "comparisons/cnndm0.json"])
    arrays = data.prepare_comparisons(rows[:60], gpt2, 512, 128, cache_dir=tmp_path)
    n = len(arrays["index"])
    assert n == 60 and arrays["query"].shape == (n, 512) and arrays["response1"].shape == (n, 128)
    assert list(arrays["choice"]) == [r["choice"] for r in rows[:60]]
    assert arrays["is_cnndm"].sum() == 55 and set(arrays["split"]) == {"valid1", "valid2"}
    assert arrays["policy0"][0] == rows[0]["policies"][0] and (arrays["confidence"] > 0).all()
    cnndm_query = gpt2.decode([t for t in arrays["query"][10] if t != data.pad_id(gpt2)])
    assert cnndm_query == data.format_query(rows[10], gpt2, 512) and cnndm_query.endswith("\n\nTL;DR:")


# ------------------------------------------------------------------------------------------ responses and ROUGE

def test_decode_responses(synth_enc):
    eos, pad = synth_enc.eot_token, data.pad_id(synth_enc)
    words = synth_enc.encode_ordinary(" My boyfriend ignores my messages.")
    rows = np.full((4, len(words) + 3), pad, dtype=np.int64)
    rows[0, :len(words) + 2] = words + [eos, words[0]]  # text after the EOS is dropped
    rows[1, :2] = words[:2]  # cut at the first PAD
    rows[2, 0] = eos  # an immediate EOS is an empty response
    rows[3] = words + words[:3]  # no EOS: the whole row
    expected = [" My boyfriend ignores my messages.", " My boyfriend", "",
                " My boyfriend ignores my messages. My boyfriend ignores"]
    assert data.decode_responses(synth_enc, rows) == expected  # the leading space is kept
    torch = pytest.importorskip("torch")
    assert data.decode_responses(synth_enc, torch.from_numpy(rows)) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    # "the" counts at most twice (the reference has two): rouge1 overlap 3, P 3/4, R 3/6, F 0.6. Bigrams: only
    # "the cat" is shared, P 1/3, R 1/5, F 0.25. LCS "the cat" = 2: P 2/4, R 2/6, F 0.4.
    ("the the the cat", "the cat sat on the mat", dict(rouge1=0.6, rouge2=0.25, rougeL=0.4)),
    # the same words in another order (Lin 2004's example): rouge1 1; of 3 bigrams only "the gunman" is shared, F
    # 1/3; the LCS is "the gunman", P = R = 2/4
    ("the gunman killed police", "police killed the gunman", dict(rouge1=1.0, rouge2=1 / 3, rougeL=0.5)),
    # case and punctuation are ignored; a non-ASCII letter splits a word like punctuation does
    ("Cheated on ME, 7-months ago... Na\u00efve!", "cheated on me 7 months ago na ve", dict(rouge1=1.0, rouge2=1.0,
                                                                                        rougeL=1.0)),
    ("cat", "Cat.", dict(rouge1=1.0, rouge2=0.0, rougeL=1.0)),  # a single word has no bigram
    ("", "a summary", dict(rouge1=0.0, rouge2=0.0, rougeL=0.0)),
    ("?!", "?!", dict(rouge1=0.0, rouge2=0.0, rougeL=0.0)),  # no tokens on either side
])
def test_rouge_by_hand(prediction, reference, expected):
    assert data.rouge(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_mean_rouge():
    means = data.mean_rouge(["the the the cat", "cat"], ["the cat sat on the mat", "Cat."])
    assert means == pytest.approx(dict(rouge1=0.8, rouge2=0.125, rougeL=0.7), abs=1e-12)
    with pytest.raises(ValueError):
        data.mean_rouge(["a"], [])


def test_rouge_matches_rouge_score_package():
    # values computed by Google's rouge-score on real summaries (tests/fixtures/make_rouge_expected.py); the texts
    # are read from the sample folder, never stored here
    expected = json.loads((ROOT / "tests/fixtures/rouge_expected.json").read_text())
    path = SAMPLE / expected["source"]
    if not path.is_file():
        pytest.skip(f"real sample files not found at {path}")
    lines = path.read_bytes().split(b"\n")
    for row in expected["rows"]:
        obj = json.loads(lines[row["line"] - 1])
        prediction = obj["summaries"][0]["text"]
        reference = obj["summaries"][1]["text"] if row["pair"] == "summary0_vs_summary1" else obj["info"]["post"]
        assert data.rouge(prediction, reference) == pytest.approx({k: row[k] for k in ("rouge1", "rouge2", "rougeL")},
                                                                  rel=0, abs=1e-9), row


# ------------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("line, message", [
    (b'{"id": "a", "subreddit": "s", "title": "t", "post": "p", "summary": "x"', "malformed JSON"),
    (b'{"id": "a", "subreddit": "s", "title": "t", "summary": "x"}', "missing field 'post'"),
    (b'{"id": "a", "subreddit": "s", "title": "t", "post": " \\n", "summary": "x"}', "empty post"),
    (b'{"id": "a", "subreddit": "s", "title": "t", "post": "\xff", "summary": "x"}', "invalid UTF-8"),
    (b'{"id": 3, "subreddit": "s", "title": "t", "post": "p", "summary": "x"}', "should be str"),
    (b'[1, 2]', "not a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message, capsys):
    good = b'{"id": "a", "subreddit": "s", "title": "t", "post": "p", "summary": "x"}'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    with pytest.raises(data.DataError, match=f"bad.jsonl:2: .*{message}"):
        data.read_tldr(path)
    assert len(data.read_tldr(path, skip_bad=True)) == 2
    assert "skipped 1 bad line(s)" in capsys.readouterr().err


def test_bad_comparison(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(info=dict(post="p", title="t", subreddit="s"), split="train", summaries=[
        dict(text=" a", policy="x", note=None)], choice=0, worker="w", batch="b", extra={})) + "\n")
    with pytest.raises(data.DataError, match="c.json:1: 'summaries' should hold two"):
        data.read_comparisons(path)
    with pytest.raises(data.DataError, match="no such file"):
        data.read_comparisons(tmp_path / "missing.json")


def test_download_without_network_fails_fast(tmp_path):
    start = time.time()
    with pytest.raises(data.DataError) as err:
        openai_data.download(tmp_path, base_url="http://127.0.0.1:9", timeout=5)
    assert time.time() - start < 10
    assert "train.jsonl" in str(err.value) and "comparisons/batch3.json" in str(err.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A local stand-in for OpenAI's blob store that, like it, answers HTTP Range requests."""
    ranged = []

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if "Range" not in self.headers or not path.is_file():
            return super().send_head()
        self.ranged.append((self.path, self.headers["Range"]))
        body = path.read_bytes()[int(self.headers["Range"].split("=")[1].rstrip("-")):]
        if not body:
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args):
        pass


@needs_sample
def test_download_resumes_and_checks(tmp_path, monkeypatch):
    blob, dest = tmp_path / "blob", tmp_path / "data"
    tldr = "".join(json.dumps(synth.synth_record(0, "train", i)) + "\n" for i in range(3))
    urls = ["http://www.cnn.com/2015/a.html", "http://www.dailymail.co.uk/news/b.html"]
    ids = [hashlib.sha1(u.encode()).hexdigest() for u in urls]
    files = {**{f"datasets/tldr_3_filtered/{s}.jsonl": tldr for s in ("train", "valid", "test")},
             "dataset/comparisons/batch18.json": (SAMPLE / "comparisons/batch18.json").read_text(),
             "dataset/axis_evals/cnndm1.json": (SAMPLE / "from_docs/axis_evals_example_from_readme.jsonl").read_text(),
             "datasets/cnndm/url_lists/all_test.txt": "\n".join(urls) + "\n",
             "datasets/cnndm/titles.json": json.dumps({ids[0]: "A title"}),
             f"datasets/cnndm/cache_test/cnn/stories/{ids[0]}.story": "Text a.\n\n@highlight\n\nPoint a",
             f"datasets/cnndm/cache_test/dailymail/stories/{ids[1]}.story": "Text b.\n\n@highlight\n\nPoint b"}
    for name, text in files.items():
        (blob / name).parent.mkdir(parents=True, exist_ok=True)
        (blob / name).write_text(text)
    monkeypatch.setattr(openai_data, "TLDR_LINES", dict(train=3, valid=3, test=3))
    monkeypatch.setattr(openai_data, "COMPARISON_FILES", ["batch18"])
    monkeypatch.setattr(openai_data, "AXIS_FILES", ["cnndm1"])
    (dest / "comparisons").mkdir(parents=True)
    (dest / "comparisons/batch18.json.part").write_bytes((SAMPLE / "comparisons/batch18.json").read_bytes()[:5000])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(blob)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        openai_data.download(dest, base_url=url, cnndm_n=0)
        assert (dest / "comparisons/batch18.json").read_bytes() == (SAMPLE / "comparisons/batch18.json").read_bytes()
        assert _RangeHandler.ranged == [("/dataset/comparisons/batch18.json", "bytes=5000-")]  # resumed, not restarted
        assert data.read_tldr(dest / "valid.jsonl") == data.read_tldr(blob / "datasets/tldr_3_filtered/valid.jsonl")
        cnndm = data.load_split("tldr", "transfer", dest)
        assert [(r["site"], r["title"], r["summary"]) for r in cnndm] == [("cnn", "A title", "Point a."),
                                                                          ("dailymail", None, "Point b.")]
        # a file that fails its check keeps its .part name: nothing looks complete that is not
        (dest / "valid.jsonl").unlink()
        (blob / "datasets/tldr_3_filtered/valid.jsonl").write_text(tldr + tldr)
        with pytest.raises(data.DataError, match="6 records, expected 3"):
            openai_data.download(dest, base_url=url, cnndm_n=0)
        assert not (dest / "valid.jsonl").exists() and (dest / "valid.jsonl.part").exists()
    finally:
        server.shutdown()


def test_parse_story():
    story = ("(CNN) -- First paragraph \u2019quoted\u2019.\n\nSecond\xa0one.\n\n@highlight\n\nNEW: Point one\n\n"
             "@highlight\n\nPoint two. CLICK HERE for more\n\n@highlight\n\nREAD: elsewhere")
    article, reference = openai_data.parse_story(story)
    assert article == "First paragraph 'quoted'.\n\nSecond one."
    assert reference == "Point one. Point two."


def test_batch_indices_cover_each_epoch_once_and_refuse_a_batch_larger_than_the_data():
    first_epoch = np.concatenate([data.batch_indices(10, 3, step, seed=0) for step in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # three batches of 3 distinct examples; one is left out of this epoch
    assert not np.array_equal(data.batch_indices(10, 3, 3, seed=0), data.batch_indices(10, 3, 0, seed=0))
    for n, size in ((5, 8), (5, 0)):
        with pytest.raises(data.DataError, match=f"{n} examples make no batch of {size}"):
            data.batch_indices(n, size, 0, seed=0)


def test_bad_records_are_named_by_file_and_line(tmp_path):
    post = dict(id="a", subreddit="r/x", title="t", post="A post.", summary="A summary.")
    (tmp_path / "train.jsonl").write_text(json.dumps(post) + "\n" + json.dumps(dict(post, summary=" ")) + "\n")
    with pytest.raises(data.DataError, match="train.jsonl:2: empty summary"):  # nothing to learn from
        data.read_tldr(tmp_path / "train.jsonl")
    comparison = dict(info=dict(id="a", subreddit="x", title="t", post="A post."), split="train", worker="w",
                      batch="b", summaries=[dict(text=" one", policy="p"), dict(text=" two", policy="q")], choice=True)
    (tmp_path / "c.json").write_text(json.dumps(comparison) + "\n")
    with pytest.raises(data.DataError, match="c.json:1: field 'choice' should be int, got bool"):  # not read as 1
        data.read_comparisons(tmp_path / "c.json")
    (tmp_path / "valid.jsonl").write_text("")
    with pytest.raises(data.DataError, match="valid.jsonl holds no records"):
        data.load_split("synth", "valid", tmp_path)


def test_an_unreadable_data_file_is_called_unreadable(tmp_path, monkeypatch):
    from test_support import unreadable  # chmod, or where root reads anyway, an open() that refuses as the OS would
    synth.write_synth(tmp_path, sizes=dict(train=4, valid=4, test=1, transfer=1), n_labelers=2)
    unreadable(monkeypatch, tmp_path / "valid.jsonl")
    with pytest.raises(data.DataError) as e:
        data.load_split("synth", "valid", tmp_path)
    assert str(e.value) == f"{tmp_path / 'valid.jsonl'}: cannot be read (Permission denied)"


@pytest.mark.parametrize("damage", ["emptied", "cut", "overwritten", "emptied json"])
def test_a_damaged_token_cache_is_built_anew(damage, tmp_path, synth_enc, capsys):
    records = [synth.synth_record(0, "train", i) for i in range(40)]
    arrays = data.prepare_sft(records, synth_enc, 96, 32, cache_dir=tmp_path)
    npz, meta = next(tmp_path.glob("sft-*.npz")), next(tmp_path.glob("sft-*.json"))
    whole = npz.read_bytes()
    damaged = {"emptied": (npz, b""), "cut": (npz, whole[:len(whole) // 2]), "emptied json": (meta, b""),
               "overwritten": (npz, whole[:1000] + bytes(64) + whole[1064:])}[damage]  # zeros inside an array
    damaged[0].write_bytes(damaged[1])
    capsys.readouterr()
    for _ in range(2):  # built anew once, then read from the cache again
        again = data.prepare_sft(records, synth_enc, 96, 32, cache_dir=tmp_path)
        assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    err = capsys.readouterr().err
    assert err.count(f"data: the cached {damaged[0]} is damaged or unreadable (") == 1 and "building it anew" in err
