"""label.py over real HTTP (the standard library's client against its server): the released format, a kill and a
restart, bad requests, the token, and training a reward model on what people labelled."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import data
import label
import locations
import reward
import synth
from support.label_server import PAGE, make_server, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]


class Client:
    """Calls a running label server the way the page does."""

    def __init__(self, url):
        self.base, self.token = url.split("/?token=")

    def call(self, path, body=None, token=None, headers=None, raw=None, method=None):
        """-> (status, JSON reply)."""
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"X-Label-Token": self.token if token is None else token, "Content-Type": "application/json"}
        h.update(headers or {})
        req = urllib.request.Request(self.base + path, data=payload, headers={k: v for k, v in h.items() if v},
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, (json.loads(body) if body.startswith(b"{") else body.decode())

    def state(self, worker):
        status, reply = self.call(f"/api/state?worker={worker}")
        assert status == 200, reply
        return reply

    def judge(self, worker, confidence, **extra):
        key = self.state(worker)["pair"]["key"]
        status, reply = self.call("/api/judge", dict(worker=worker, pair=key, confidence=confidence, **extra))
        assert status == 200, reply
        return reply


@pytest.fixture
def served(tmp_path):
    """Start a label server in this process on the pairs `args` draw; yields a Client; stops it after."""
    servers = []

    def start(argv):
        args = label.parse_args(argv + ["--port", "0", "--quiet"])
        labels = label.Labels(args.out, label.load_or_make_pairs(args), args.batch, args.seed)
        server = make_server(labels, args.host, 0, quiet=True)
        serve_in_thread(server)
        servers.append(server)
        return Client(server.url), labels

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def synth_comparisons(tmp_path, n=12):
    """A comparisons file of synthetic posts judged by simulated labelers (for --relabel)."""
    records = [synth.synth_record(0, "valid", i) for i in range(n)]
    candidates = [[("sft", synth.perturb_summary(r, "drop_fact")), ("ppo", synth.perfect_summary(r))] for r in records]
    comps = data.collect_comparisons(records, candidates, synth.make_labelers(3), np.random.default_rng(0), 0.25)
    path = tmp_path / "simulated.json"
    data.write_jsonl(path, comps)
    return path, comps


# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_labels_of_sampled_pairs_are_the_released_format_and_train_a_reward_model(stages, served, tmp_path):
    root, common = stages
    out = tmp_path / "me.json"
    client, labels = served(["--policies", str(root / "out" / "sft.pt"), "--data-dir", str(root / "data"),
                             "--n-pairs", "40", "--out", str(out), "--valid-fraction", "0.25"])
    pairs = labels.pairs
    assert len(pairs) == 40 and {p["split"] for p in pairs} == {"train", "valid2"}
    for p in pairs:  # the held-out pairs are of valid-split posts, which no stage trained on
        assert ("_valid_" in p["info"]["id"]) == (p["split"] == "valid2")
    assert sum(p["split"] == "valid2" for p in pairs) == 10
    assert all(p["summaries"][0][0] in ("sft_t0.7", "ref") and p["summaries"][0][1] != p["summaries"][1][1]
               for p in pairs)
    shown = []
    for i in range(40):
        state = client.state("ann")
        assert state["done"] == i and state["total"] == 40
        assert "policy" not in json.dumps(state)  # the person never sees which policy wrote what
        shown.append(state["pair"]["summaries"])
        extra = dict(axes=[{"overall": 6, "coverage": 5}, {}], notes=["clear", ""]) if i == 0 else {}
        client.judge("ann", [2, 8, 4, 9][i % 4], **extra)
    assert client.state("ann")["pair"] is None and client.state("ann")["done"] == 40

    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 41
    for i, line in enumerate(lines[:-1]):
        obj = json.loads(line)
        assert line.decode() == json.dumps(obj)  # byte for byte the released files' json.dumps defaults
        assert list(obj) == ["info", "split", "summaries", "choice", "worker", "batch", "extra"]
        assert list(obj["info"]) == ["id", "post", "title", "subreddit"] and obj["worker"] == "ann"
        assert obj["batch"] == "me" and obj["extra"]["confidence"] == [2, 8, 4, 9][i % 4]
        assert obj["choice"] == (0 if obj["extra"]["confidence"] < 5 else 1)
        assert [s["text"] for s in obj["summaries"]] == shown[i]  # summaries[0] is what the person saw on the left
    first = json.loads(lines[0])["summaries"]
    assert first[0]["axes"] == {"overall": 6, "coverage": 5} and first[0]["note"] == "clear"
    assert "axes" not in first[1] and first[1]["note"] is None
    assert len(data.read_comparisons(out)) == 40

    # the reward model trains on the person's labels alone, and beside the simulated ones
    for name, files in (("alone", [out]), ("mixed", [root / "out" / "comparisons" / f"synth_{s}.json"
                                                      for s in ("train", "valid")] + [out])):
        rm_out = tmp_path / name
        reward.main(common[:4] + ["--out-dir", str(rm_out), "--cache-dir", str(tmp_path / "cache"), "--sft",
                                  str(root / "out" / "sft.pt"), "--comparisons", *map(str, files),
                                  "--batch-size", "8", "--norm-n", "16", "--val-size", "8"])
        metrics = json.loads((rm_out / "reward.json").read_text())
        mine = metrics["accuracy"]["synth"]["per_batch"]["me"]  # the RM's agreement with the person, held out
        assert mine["n"] == sum(p["split"] == "valid2" for p in pairs)
        assert ("labeler_agreement" in metrics) == (name == "mixed")  # no simulated second opinion of a person


def test_bad_requests_are_refused_and_never_touch_the_file(served, tmp_path):
    path, _ = synth_comparisons(tmp_path)
    out = tmp_path / "labels.json"
    client, _ = served(["--relabel", str(path), "--out", str(out)])
    pair = client.state("ann")["pair"]["key"]
    client.judge("ann", 3)
    before = out.read_bytes()
    good = dict(worker="ann", pair=client.state("ann")["pair"]["key"], confidence=7)
    cases = [
        (403, "X-Label-Token", dict(body=good, token="")),
        (403, "X-Label-Token", dict(body=good, token="not-the-token")),
        (403, "cross-site", dict(body=good, headers={"Origin": "http://evil.example"})),
        (415, "application/json", dict(body=good, headers={"Content-Type": "text/plain"})),
        (400, "not JSON", dict(raw=b"{confidence: 7")),
        (400, "JSON object", dict(raw=b"[1, 2]")),
        (413, "bytes", dict(raw=b" " * (1 << 17))),
        (400, "no body", dict(raw=b"")),
        (400, "no 5", dict(body=dict(good, confidence=5))),
        (400, "confidence", dict(body=dict(good, confidence="7"))),
        (400, "confidence", dict(body=dict(good, confidence=True))),
        (400, "from 1 to 7", dict(body=dict(good, axes=[{"overall": 8}, {}]))),
        (400, "unknown axis", dict(body=dict(good, axes=[{"style": 3}, {}]))),
        (400, "two objects", dict(body=dict(good, axes=[{"overall": 3}]))),
        (400, "notes", dict(body=dict(good, notes=["a", 3]))),
        (400, "longer than", dict(body=dict(good, notes=["x" * 5000, None]))),
        (400, "worker id", dict(body=dict(good, worker="<script>"))),
        (400, "worker id", dict(body=dict(good, worker=""))),
        (404, "no pair", dict(body=dict(good, pair="0123456789abcdef"))),
        (404, "no pair", dict(body=dict(good, pair=["a list"]))),
        (409, "already labelled", dict(body=dict(good, pair=pair))),
    ]
    for status, words, kwargs in cases:
        got, reply = client.call("/api/judge", **kwargs)
        assert (got, words in str(reply)) == (status, True), (kwargs, got, reply)
    assert client.call("/api/state?worker=ann", token="wrong")[0] == 403
    assert client.call("/api/nothing")[0] == 404
    assert client.call("/api/judge", body=good, method="PUT")[0] == 405
    assert out.read_bytes() == before  # nothing written by any of them
    client.judge("ann", 7)  # and the good one still goes through
    assert len(out.read_bytes().splitlines()) == 2


def test_the_page_needs_the_token_and_never_inserts_text_as_markup(served, tmp_path):
    path, _ = synth_comparisons(tmp_path)
    client, _ = served(["--relabel", str(path), "--out", str(tmp_path / "labels.json")])
    for query in ("", "?token=wrong"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(client.base + "/" + query, timeout=30)
        assert err.value.code == 403
    with urllib.request.urlopen(f"{client.base}/?token={client.token}", timeout=30) as res:
        csp, html = res.headers["Content-Security-Policy"], res.read().decode()
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<script nonce="{nonce}">' in html and "default-src 'none'" in csp  # only the page's own script runs
    assert client.token not in html  # the token stays in the address, never in a page a cache could keep
    # Text from the server only ever goes in as text; the browser test checks a post full of markup for real.
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", PAGE.read_text())


def test_relabelling_reports_agreement_with_the_original_labelers_and_the_gold_rubric(served, tmp_path, capsys):
    path, comps = synth_comparisons(tmp_path, n=16)
    out = tmp_path / "relabel.json"
    client, labels = served(["--relabel", str(path), "--out", str(out)])
    # ann picks what the gold rubric prefers (the left summary where gold ties); bob always picks the left one
    gold_agree = orig_agree = 0
    ann_chose = {}
    for _ in range(16):
        state = client.state("ann")
        pair = labels.by_key[state["pair"]["key"]]
        texts = state["pair"]["summaries"]
        gold = [synth.gold_score(pair["info"], t)["total"] for t in texts]
        pick = int(gold[1] > gold[0])
        client.judge("ann", 8 if pick else 2)
        gold_agree += gold[0] != gold[1]
        orig_agree += texts[pick] in pair["originals"]
        ann_chose[pair["key"]] = texts[pick]
    same = 0
    for _ in range(5):
        shown = client.state("bob")["pair"]
        same += shown["summaries"][0] == ann_chose[shown["key"]]
        client.judge("bob", 1)
    ann = client.state("ann")
    assert ann["gold"] == dict(agree=gold_agree, n=gold_agree) and ann["original"] == dict(agree=orig_agree, n=16)
    label.main(["--out", str(out), "--report"])
    text = capsys.readouterr().out
    p = orig_agree / 16
    assert f"with the original labelers {p:.1%} +- {(p * (1 - p) / 16) ** 0.5:.1%} ({orig_agree}/16)" in text
    # at 100% the standard error is 0 and meaningless: the rule of three's bound is printed instead
    assert f"agrees with the gold rubric 100% ({gold_agree}/{gold_agree}; 95% bound: at least " \
           f"{1 - 3 / gold_agree:.0%})" in text
    assert "bob: 5 labelled" in text
    assert f"between people, on pairs labelled by two or more: {label.rate(same, 5)}" in text


def test_a_killed_server_loses_nothing_and_everyone_continues_where_they_were(tmp_path):
    path, _ = synth_comparisons(tmp_path)
    out = tmp_path / "labels.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def start(*flags):
        proc = subprocess.Popen([sys.executable, str(ROOT / "label.py"), "--out", str(out), "--port", "0", "--quiet",
                                 *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            if "open http" in line:
                return proc, Client(line.split("open ")[1].strip())
        raise AssertionError(f"label.py did not start: {proc.wait()}")

    proc, client = start("--relabel", str(path), "--seed", "5", "--batch", "b1")
    seen = [client.state("ann")["pair"]]
    for confidence in (1, 9, 4):
        seen.append(client.judge("ann", confidence)["pair"])
    client.judge("bob", 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes()
    assert len(written.splitlines()) == 4  # every acknowledged judgement is on disk

    proc, again = start()  # no flags: the same pairs, from labels.json.pairs.json
    try:
        assert again.call("/api/state?worker=ann", token=client.token)[0] == 403  # a new token each start
        ann = again.state("ann")
        assert ann["done"] == 3 and ann["pair"] == seen[3]  # the next pair, not a repeat, left and right the same
        assert again.state("bob")["done"] == 1 and again.state("carol")["done"] == 0
        again.judge("ann", 2)
        assert out.read_bytes().startswith(written) and len(out.read_bytes().splitlines()) == 5
        assert {json.loads(line)["batch"] for line in out.read_text().splitlines()} == {"b1"}  # --batch restored
    finally:
        proc.kill()
        proc.wait()


def test_a_torn_last_line_is_set_aside_and_other_flags_are_refused(tmp_path, capsys):
    path, _ = synth_comparisons(tmp_path)
    out = tmp_path / "labels.json"
    args = label.parse_args(["--relabel", str(path), "--out", str(out)])
    labels = label.Labels(out, label.load_or_make_pairs(args), "labels", 0)
    labels.judge(dict(worker="ann", pair=labels.state("ann")["pair"]["key"], confidence=2))
    good = out.read_bytes()
    out.write_bytes(good + b'{"info": {"id": "synth3_0_val')  # a power cut in the middle of an append
    labels = label.Labels(out, labels.pairs, "labels", 0, serving=True)
    assert out.read_bytes() == good and labels.state("ann")["done"] == 1
    assert (tmp_path / "labels.json.torn").read_bytes().startswith(b'{"info"')
    assert "cut short" in capsys.readouterr().err
    # a whole judgement that only lacks its newline is kept (a newline added); --report reads without writing
    whole = good.splitlines(keepends=True)[-1]
    out.write_bytes(good + whole.rstrip(b"\n"))
    label.main(["--out", str(out), "--report"])
    assert out.read_bytes() == good + whole.rstrip(b"\n") and "no newline; left out here" in capsys.readouterr().err
    label.Labels(out, labels.pairs, "labels", 0, serving=True)
    assert out.read_bytes() == good + whole
    with pytest.raises(SystemExit, match="--n-pairs 7 but .* was drawn with 50"):
        label.load_or_make_pairs(label.parse_args(["--relabel", str(path), "--out", str(out), "--n-pairs", "7"]))
    with pytest.raises(SystemExit, match="does not exist yet: give --policies or --relabel"):
        label.load_or_make_pairs(label.parse_args(["--out", str(tmp_path / "other.json")]))
    with pytest.raises(data.DataError, match="synthetic posts, but --task tldr"):
        label.load_or_make_pairs(label.parse_args(["--relabel", str(path), "--task", "tldr",
                                                   "--out", str(tmp_path / "x.json")]))


SAMPLE = locations.SAMPLE / "comparisons"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real sample files not found at {SAMPLE}")
def test_openai_comparisons_are_relabelled_as_reddit_posts_and_cnndm_is_refused(served, tmp_path):
    client, labels = served(["--relabel", str(SAMPLE / "batch18.json"), "--n-pairs", "10",
                             "--out", str(tmp_path / "b18.json")])
    originals = data.read_comparisons(SAMPLE / "batch18.json")
    assert len(labels.pairs) == 10 and all(p["info"]["id"].startswith("t3_") for p in labels.pairs)
    state = client.state("ann")
    pair = labels.by_key[state["pair"]["key"]]
    same = [c for c in originals if label.pair_key(c, c["summaries"]) == pair["key"]]
    assert same and sorted(pair["originals"]) == sorted(c["summaries"][c["choice"]] for c in same)
    left_is_original = state["pair"]["summaries"][0] in pair["originals"]
    assert client.judge("ann", 1 if left_is_original else 9)["original"] == dict(agree=len(same), n=len(same))
    written = json.loads((tmp_path / "b18.json").read_text())
    assert written["split"] == same[0]["split"]
    assert {s["policy"] for s in written["summaries"]} == set(same[0]["policies"])
    with pytest.raises(data.DataError, match="no comparisons of Reddit posts"):
        label.load_or_make_pairs(label.parse_args(["--relabel", str(SAMPLE / "cnndm0.json"),
                                                   "--out", str(tmp_path / "cnn.json")]))


def test_a_busy_port_and_a_damaged_pairs_file_are_clear_errors(served, tmp_path):
    path, _ = synth_comparisons(tmp_path)
    client, labels = served(["--relabel", str(path), "--out", str(tmp_path / "a.json")])
    port = client.base.rsplit(":", 1)[1]
    with pytest.raises(OSError, match=f"cannot listen on --host 127.0.0.1 --port {port}"):
        label.main(["--out", str(tmp_path / "a.json"), "--port", port, "--quiet"])
    (tmp_path / "b.json.pairs.json").write_text('{"settings": {"task": "syn')
    with pytest.raises(data.DataError, match="b.json.pairs.json: not a pairs file written by label.py"):
        label.main(["--out", str(tmp_path / "b.json")])


def test_several_people_at_once_each_judgement_once(served, tmp_path):
    path, _ = synth_comparisons(tmp_path)
    out = tmp_path / "labels.json"
    client, _ = served(["--relabel", str(path), "--out", str(out)])
    key = client.state("ann")["pair"]["key"]

    def post(worker):
        return client.call("/api/judge", dict(worker=worker, pair=key, confidence=3))[0]

    with ThreadPoolExecutor(16) as pool:  # ann in many tabs at once, and 20 other people
        statuses = list(pool.map(post, ["ann"] * 20 + [f"w{i}" for i in range(20)]))
    assert sorted(statuses[:20]) == [200] + [409] * 19 and statuses[20:] == [200] * 20
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 21 and len({x["worker"] for x in lines}) == 21


def test_a_failed_write_leaves_no_half_line_and_a_second_server_is_refused(served, tmp_path, monkeypatch):
    path, _ = synth_comparisons(tmp_path)
    out = tmp_path / "labels.json"
    args = label.parse_args(["--relabel", str(path), "--out", str(out)])
    labels = label.Labels(out, label.load_or_make_pairs(args), "labels", 0, serving=True)
    labels.judge(dict(worker="ann", pair=labels.state("ann")["pair"]["key"], confidence=2))
    before = out.read_bytes()
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):  # the disk gives out after the line was written, before it is durable
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    key = labels.state("ann")["pair"]["key"]
    with pytest.raises(OSError, match="No space left"):
        labels.judge(dict(worker="ann", pair=key, confidence=7))
    assert out.read_bytes() == before and labels.state("ann")["done"] == 1  # cut back, not counted
    labels.judge(dict(worker="ann", pair=key, confidence=7))  # the retry is a whole line of its own
    assert len(data.read_comparisons(out)) == 2
    monkeypatch.undo()

    with label.lock_labels(out):  # a server is running on this file
        with pytest.raises(SystemExit, match="another label.py .pid [0-9]+. is serving"):
            label.main(["--out", str(out), "--port", "0"])
    client, _ = served(["--out", str(out)])
    conn = http.client.HTTPConnection(*client.base.removeprefix("http://").split(":"))
    conn.putrequest("POST", "/api/judge")  # no Content-Length
    conn.putheader("X-Label-Token", client.token)
    conn.endheaders()
    assert conn.getresponse().status == 411


def test_a_huge_number_deep_nesting_and_another_scheme_are_refused(served, tmp_path):
    # The first two were answered 500 (a server error: Python's int limit, its recursion limit); an Origin of another
    # scheme on the same host and port passed the cross-site check.
    path, _ = synth_comparisons(tmp_path)
    out = tmp_path / "labels.json"
    client, _ = served(["--relabel", str(path), "--out", str(out)])
    good = dict(worker="ann", pair=client.state("ann")["pair"]["key"], confidence=7)
    host = client.base.removeprefix("http://")
    cases = [(400, "not JSON", dict(raw=b'{"confidence": ' + b"7" * 5000 + b"}")),
             (400, "nested too deep", dict(raw=b"[" * 30000 + b"]" * 30000)),
             (403, "cross-site", dict(body=good, headers={"Origin": f"https://{host}"})),
             (403, "cross-site", dict(body=good, headers={"Origin": f"ws://{host}"}))]
    for status, words, kwargs in cases:
        got, reply = client.call("/api/judge", **kwargs)
        assert (got, words in str(reply)) == (status, True), (kwargs, got, reply)
    assert not out.exists() or out.read_bytes() == b""
    assert client.call("/api/judge", body=good, headers={"Origin": f"http://{host}"})[0] == 200  # the page's own
    assert len(out.read_bytes().splitlines()) == 1


def test_an_idle_connection_is_closed_after_the_timeout(tmp_path):
    # Each connection holds a thread; one that sent nothing, or a body cut short, held it forever.
    path, _ = synth_comparisons(tmp_path)
    args = label.parse_args(["--relabel", str(path), "--out", str(tmp_path / "labels.json")])
    labels = label.Labels(args.out, label.load_or_make_pairs(args), args.batch, args.seed)
    server = make_server(labels, "127.0.0.1", 0, quiet=True, idle_timeout=0.5)
    serve_in_thread(server)
    try:
        for sent in (b"", b"POST /api/judge HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"):
            with socket.create_connection(server.server_address[:2], timeout=10) as s:
                s.sendall(sent)
                start = time.monotonic()
                assert s.recv(1024) == b""  # closed, without a reply (the timeout bounds this wait: 10 s)
                assert time.monotonic() - start < 5
    finally:
        server.shutdown()
        server.server_close()


def test_ppo_rloo_and_dpo_policies_are_sampled_side_by_side_each_under_its_own_name(stages, served, tmp_path):
    from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_name, save_checkpoint
    root, _ = stages
    sft_ckpt = load_checkpoint(root / "out" / "sft.pt")
    model = model_from_checkpoint(sft_ckpt)
    meta = dict(task="synth", tokenizer=sft_ckpt["tokenizer"])
    paths = {"ppo": tmp_path / "ppo-beta0.05" / "ppo.pt", "rloo": tmp_path / "rloo-beta0.05" / "ppo.pt",
             "dpo": tmp_path / "dpo-beta0.1" / "dpo.pt"}
    for method, path in paths.items():  # the SFT weights under each stage's name: this test is about the page
        path.parent.mkdir()
        stage = "dpo" if method == "dpo" else "ppo"
        save_checkpoint(path, model, stage=stage, args=dict(estimator=method) if stage == "ppo" else {}, **meta)
    assert policy_name(tmp_path / "rloo" / "ppo_step20.pt", load_checkpoint(paths["rloo"])) == "rloo_step20"
    client, labels = served(["--policies", str(root / "out" / "sft.pt"), *map(str, paths.values()), "--data-dir",
                             str(root / "data"), "--n-pairs", "40", "--samples", "1", "--out", str(tmp_path / "m.json"),
                             "--ref-fraction", "0"])
    shown = {name for p in labels.pairs for name, _ in p["summaries"]}
    assert shown == {"sft_t0.7", "ppo_t0.7", "rloo_t0.7", "dpo_t0.7"}  # no folder needed to tell PPO from RLOO
    client.judge("ann", 3)
    written = json.loads((tmp_path / "m.json").read_text())
    assert {s["policy"] for s in written["summaries"]} <= shown
