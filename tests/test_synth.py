"""Tests of synth.py: the synthetic world is pinned and loads through data.py's readers, the gold labeler rewards a
concise complete summary and punishes the usual exploits, the simulated labelers agree as often as the paper's, and
comparisons collected from them are in the original format. Hermetic: nothing outside the repository is needed."""
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import synth  # noqa: E402


@pytest.fixture(scope="module")
def enc():
    return data.get_tokenizer(data.SYNTH_TOKENIZER)


@pytest.fixture(scope="module")
def world():
    return [synth.synth_record(0, "valid", i) for i in range(300)]


def test_synth_tokenizer(enc):
    assert data.pad_id(enc) == enc.n_vocab and enc.eot_token == enc.n_vocab - 1
    text = data.format_query(synth.synth_record(3, "train", 7), enc, 96)
    tokens = enc.encode_ordinary(text)
    assert len(tokens) == len(data.PAT_ASCII.findall(text)) and enc.decode(tokens) == text  # one token per word
    assert enc.decode(enc.encode_ordinary("caf\u00e9 zyx")) == "caf\u00e9 zyx"  # any text still encodes
    assert enc.encode("x<|endoftext|>", allowed_special="all")[-1] == enc.eot_token
    with pytest.raises(data.DataError, match="unknown tokenizer"):
        data.get_tokenizer("nope")



def test_synth_is_deterministic_and_loads_through_readers(tmp_path):
    stats = synth.write_synth(tmp_path, seed=5, sizes=dict(train=50, valid=20, test=20, transfer=20), n_labelers=4)
    train = data.load_split("synth", "train", tmp_path)
    assert train == [synth.synth_record(5, "train", i) for i in range(50)]
    assert train != [synth.synth_record(6, "train", i) for i in range(50)]
    assert (tmp_path / "train.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in train)
    transfer = data.read_tldr(tmp_path / "transfer.jsonl")
    assert {r["subreddit"] for r in transfer} == set(synth.TRANSFER_SUBREDDITS)
    assert not {r["subreddit"] for r in train} & set(synth.TRANSFER_SUBREDDITS)
    vps = [vp for vp, _ in synth.TRANSFER_PROBLEMS]
    assert not any(vp in r["post"] for r in train for vp in vps) and all(any(vp in r["post"] for vp in vps)
                                                                        for r in transfer)
    assert json.loads((tmp_path / "synth.json").read_text())["agreement"] == stats["agreement"]


def test_synth_world_and_tokenizer_are_pinned(enc):
    # the same records and tokens on every machine and run; if the world's tables change on purpose, bump
    # synth.WORLD (and data.SYNTH_TOKENIZER when its words change) and these numbers together
    records = json.dumps([synth.synth_record(0, split, i) for split in ("train", "transfer") for i in range(20)])
    assert hashlib.sha256(records.encode()).hexdigest()[:16] == "911d7bd822389776"
    assert enc.n_vocab == 1241
    assert enc.encode_ordinary(" How do I get him to stop?") == [612, 939, 617, 978, 1002, 1205, 1179, 63]


def test_synth_lengths(enc, world):
    queries = [len(enc.encode_ordinary(data.format_query(r, enc, 10**9))) for r in world]
    summaries = [len(enc.encode_ordinary(" " + r["summary"])) for r in world]
    assert 60 <= np.mean(queries) <= 95 and max(queries) <= data.TASKS["synth"]["query_len"]
    assert 8 <= np.mean(summaries) <= 25


def test_gold_rewards_a_concise_complete_summary(world):
    for rec in world[:100]:
        perfect = synth.perfect_summary(rec)
        best = synth.gold_score(rec, perfect)
        assert best == dict(total=1.0, coverage=1.0, accuracy=1.0, coherence=1.0, length=1.0)
        post_details = " ".join(s + "." for s in synth._synth_world(rec["id"])[1]["details"])
        exploits = {
            "stuffing": perfect + " " + post_details + " " + perfect,
            "repetition": perfect + " " + perfect + " " + perfect,
            "copy": rec["post"],
            "query": data.format_query(rec, data.get_tokenizer(data.SYNTH_TOKENIZER), 96),
            "junk": "zq zq TL;DR: 12 ) ) (",
            "keywords": " ".join(synth._words(perfect)[1:-1]).replace(".", ""),
            "empty": "",
            "truncated": perfect[:-6],
        }
        for kind, text in exploits.items():
            assert synth.gold_score(rec, text)["total"] < best["total"] - 0.05, (kind, text)
        for kind in ("drop_fact", "add_false_fact", "wrong_number", "swap_roles", "add_detail", "shorter"):
            assert synth.gold_score(rec, synth.perturb_summary(rec, kind))["total"] < best["total"], kind
        assert synth.gold_score(rec, synth.perturb_summary(rec, "longer"))["total"] == best["total"]
        main, rest = perfect.split(". ", 1)
        echo = synth.gold_score(rec, f"{main}. {main}. {rest}")  # the first sentence said twice
        assert echo["coherence"] < 1 and echo["total"] < best["total"] - 0.05
        swapped = synth.gold_score(rec, synth.perturb_summary(rec, "swap_roles"))
        assert swapped["accuracy"] < 1 and swapped["coherence"] == 1


def test_references_are_beatable(world):
    assert synth.gold_win_rate(world, [synth.perfect_summary(r) for r in world]) > 0.9
    # a policy that copies the poster's most common habits (who and what only) wins about half the time (ties count
    # a half): the references are flawed, but not so much that imitating their omissions beats them
    assert 0.35 < synth.gold_win_rate(world, [synth.perturb_summary(r, "shorter") for r in world]) < 0.6
    scores = [synth.gold_score(r, r["summary"]) for r in world]
    # about half the key facts' weight (the problem, who, now and then what was tried or the question), and a slip
    assert 0.4 < np.mean([s["coverage"] for s in scores]) < 0.7 and np.mean([s["accuracy"] for s in scores]) < 1
    assert all(s["coherence"] == 1 for s in scores)  # flawed in content, never in form


def test_gold_needs_the_synthetic_record(world):
    with pytest.raises(data.DataError, match="not a synthetic record id"):
        synth.gold_score(dict(world[0], id="t3_abc"), "x")
    with pytest.raises(data.DataError, match="post differs"):
        synth.gold_score(dict(world[0], post="another post"), "x")


def test_labeler_agreement_in_paper_range(world):
    labelers = synth.make_labelers(10, seed=0)
    assert len({x.worker for x in labelers}) == 10 and all(len(x.worker) == 30 for x in labelers)
    assert 0.73 <= synth.labeler_agreement(world, labelers, random.Random(0)) <= 0.77
    choices = [labelers[0].compare(r, synth.perfect_summary(r), r["summary"]) for r in world]
    assert all((c < 5) == (choice == 0) and 1 <= c <= 9 and c != 5 for choice, c in choices)


def test_labelers_are_unsure_about_close_calls_not_about_their_mistakes():
    """Confidence comes from the perceived margin, the same noisy perception that makes the choice: on a few thousand
    typical pairs that gold tells apart, the labelers agree with gold more often the surer they say they are, and at
    least half of the time at every level (a labeler that knew its mistakes would be below half where unsure)."""
    labelers, rng = synth.make_labelers(10, seed=0), random.Random(0)
    agree = {strength: [] for strength in (1, 2, 3, 4)}
    for i in range(5000):
        record = synth.synth_record(0, "valid", i % 1000)
        a = synth.sample_reference(record, rng)
        b = synth.sample_reference(record, rng) if i % 2 else synth.perturb_summary(
            record, rng.choice(synth.PERTURBATIONS), rng)
        diff = synth.gold_score(record, a)["total"] - synth.gold_score(record, b)["total"]
        if abs(diff) > 1e-9:
            choice, confidence = labelers[i % 10].compare(record, a, b)
            agree[abs(confidence - 5)].append((choice == 0) == (diff > 0))
    rates = [np.mean(agree[s]) for s in (1, 2, 3, 4) if len(agree[s]) >= 100]
    assert len(rates) >= 3 and all(r >= 0.5 for r in rates)
    assert all(lo < hi for lo, hi in zip(rates, rates[1:]))  # about 61, 83, 94, 99% on these pairs


def test_collect_comparisons_writes_original_format(tmp_path, world):
    records = world[:40]
    candidates = [[("sup_t0", synth.perfect_summary(r)), ("bad", synth.perturb_summary(r, "swap_roles"))]
                  for r in records]
    comps = data.collect_comparisons(records, candidates, synth.make_labelers(3, seed=1), np.random.default_rng(0),
                                     ref_fraction=0.5, pairs_per_record=2, split="train", batch="synth0")
    data.write_jsonl(tmp_path / "synth0.json", comps)
    lines = (tmp_path / "synth0.json").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 81
    for line, comp in zip(lines, comps):
        assert line == json.dumps(comp).encode("ascii")
        assert list(comp) == ["info", "split", "summaries", "choice", "worker", "batch", "extra"]
        assert list(comp["info"]) == ["id", "post", "title", "subreddit"]
        assert [list(s) for s in comp["summaries"]] == [["text", "policy", "note"]] * 2
    rows = data.read_comparisons(tmp_path / "synth0.json")
    assert len(rows) == 80 and {p for r in rows for p in r["policies"]} == {"sup_t0", "bad", "ref"}
    assert all(r["policies"][0] != r["policies"][1] for r in rows)
    # the labelers mostly see that the perfect summary beats the swapped one
    with_ref = np.mean(["ref" in r["policies"] for r in rows])
    assert 0.35 < with_ref < 0.65  # ref_fraction 0.5
    assert np.mean([r["policies"][0] == "ref" for r in rows if "ref" in r["policies"]]) not in (0.0, 1.0)  # both sides
    duels = [r for r in rows if set(r["policies"]) == {"sup_t0", "bad"}]
    assert np.mean([r["policies"][r["choice"]] == "sup_t0" for r in duels]) > 0.8


@pytest.mark.slow
def test_synth_command_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "synth.py"), "--out-dir", str(tmp_path), "--n-train", "100",
                          "--n-valid", "100", "--n-test", "10", "--n-transfer", "10"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "agreement" in out.stdout and (tmp_path / "valid.jsonl").is_file()


def edit_line(path, lineno, **fields):
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = json.dumps(dict(json.loads(lines[lineno - 1]), **fields)) + "\n"
    path.write_text("".join(lines))


def test_a_post_edited_by_hand_is_refused_when_read_naming_file_and_line(tmp_path):
    synth.write_synth(tmp_path, sizes=dict(train=8, valid=8, test=1, transfer=1), n_labelers=2)
    edit_line(tmp_path / "valid.jsonl", 3, summary="My own words.")  # a reference may be rewritten: gold ignores it
    assert data.load_split("synth", "valid", tmp_path)[2]["summary"] == "My own words."
    post = synth.synth_record(0, "valid", 2)["post"]
    edit_line(tmp_path / "valid.jsonl", 3, post=post.replace(" have ", " had ", 1))
    with pytest.raises(data.DataError, match=f"^{tmp_path / 'valid.jsonl'}:3: post of synth3_0_valid_2 differs from "
                                             "the synthetic world.s synth3 from character"):
        data.load_split("synth", "valid", tmp_path)
    # the same in a comparisons file (reward.py --comparisons, evaluate.py, label.py --relabel)
    rec = dict(synth.synth_record(0, "valid", 5), post=post)
    comps = [data.comparison_record(synth.synth_record(0, "valid", 4), [("a", "x"), ("b", "y")], 0, "w", "valid2", "b"),
             data.comparison_record(rec, [("a", "x"), ("b", "y")], 0, "w", "valid2", "b")]
    data.write_jsonl(tmp_path / "c.json", comps)
    with pytest.raises(data.DataError, match=f"^{tmp_path / 'c.json'}:2: post of synth3_0_valid_5 differs"):
        data.read_comparisons(tmp_path / "c.json")


def test_sft_refuses_an_edited_post_before_it_trains(tmp_path):
    import sft
    synth.write_synth(tmp_path / "data", sizes=dict(train=32, valid=16, test=1, transfer=1), n_labelers=2)
    edit_line(tmp_path / "data" / "valid.jsonl", 5, post="I wrote this post myself.")
    with pytest.raises(data.DataError, match=f"{tmp_path / 'data' / 'valid.jsonl'}:5: post of synth3_0_valid_4 "):
        sft.main(["--task", "synth", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                  "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--n-layer", "1", "--n-head", "1",
                  "--n-embd", "16", "--batch-size", "16", "--sample-n", "4"])
    assert not (tmp_path / "out" / "sft.log.jsonl").exists()  # not a step was taken
