"""evaluate.py: its statistics by hand, the http judge against a stub server on 127.0.0.1, and a short end-to-end
evaluation of tiny synthetic checkpoints that writes every output."""
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import data
import evaluate
import ppo
import synth
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.http_judge import HTTPJudge, JudgeError, parse_verdict

# --- statistics and metrics, by hand ---

def test_copying_is_the_bigram_lcs_with_the_source_over_the_summary_bigrams():
    post = "My boyfriend eats my food. I have a cat."
    assert data.copying("my boyfriend eats my food", post) == 1.0  # a verbatim excerpt
    # bigrams: (my boyfriend) (boyfriend steals) (steals my) (my food): 2 of 4 appear in order in the post
    assert data.copying("My boyfriend steals my food!", post) == 0.5
    assert data.copying("food", post) == 0.0  # no bigram at all
    # order matters: an LCS, not a bag of bigrams
    assert data.copying("I have a cat. My boyfriend eats", post) == pytest.approx(3 / 6)


def test_mean_and_standard_error():
    m = evaluate.mean_se([1, 0, 1, 1])
    assert m["mean"] == 0.75 and m["n"] == 4
    assert m["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # a binomial proportion's error
    m = evaluate.mean_se([1, 0.5, 0, np.nan])  # a tie is half a win; no verdict is left out
    assert m["n"] == 3 and m["mean"] == 0.5
    assert m["stderr"] == pytest.approx(np.std([1, 0.5, 0]) / math.sqrt(3))
    assert evaluate.mean_se([np.nan])["mean"] is None


def test_best_of_n_kl_formula():
    assert evaluate.bon_kl(1) == 0.0
    assert evaluate.bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert evaluate.bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def test_agreement_counts_ties_as_half_and_skips_nan():
    a = evaluate.agreement([1.0, -2.0, 0.0, np.nan, 3.0], [1, 0, 1, 1, 0])
    assert a["n"] == 4 and a["mean"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)


def test_length_control_recovers_known_intercepts_and_slope():
    # preference = sigmoid(intercept + slope * log ratio): policy "long" wins by being long, "fair" by quality
    rng = np.random.default_rng(0)
    truth, slope = dict(long=-0.4, fair=0.6), 1.5
    wins, ratios = {}, {}
    for name, b in truth.items():
        x = rng.normal(1.0 if name == "long" else 0.0, 0.5, 20000)
        wins[name] = (rng.random(len(x)) < 1 / (1 + np.exp(-(b + slope * x)))).astype(float)
        ratios[name] = x
    lc, fitted = evaluate.length_controlled(wins, ratios)
    assert fitted == pytest.approx(slope, abs=0.08)
    for name, b in truth.items():
        assert lc[name] == pytest.approx(1 / (1 + math.exp(-b)), abs=0.02)
    assert wins["long"].mean() > 0.6 > lc["long"]  # raw preference flatters the long policy; control removes it


def test_gold_judge_verdicts():
    rec = synth.synth_record(0, "test", 0)
    judge = evaluate.Gold()
    best = synth.perfect_summary(rec)
    worse = synth.perturb_summary(rec, "add_false_fact")
    assert judge.prefer([rec] * 3, [best, worse, best], [worse, best, best]).tolist() == [1.0, 0.0, 0.5]
    assert set(judge.axes([rec], [best])) == {"total", "coverage", "accuracy", "coherence", "length"}


# --- the http judge against a stub server ---

class Stub(BaseHTTPRequestHandler):
    """An OpenAI-style chat-completions server that prefers the summary with the word 'good' in it. `script` lists
    what to do with the next requests (ok, garbage, no-verdict, slow, 401, 500); then it answers normally."""
    script, prompts = [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        Stub.prompts.append((self.path, self.headers.get("Authorization"), prompt))
        action = Stub.script.pop(0) if Stub.script else "ok"
        if action in ("401", "500"):
            self.send_error(int(action))
            return
        if action == "slow":
            time.sleep(1.0)
        a = prompt.split("Summary A:")[1].split("Summary B:")[0]
        content = f"A reason.\nPreferred: {'A' if 'good' in a else 'B'}" if action != "no-verdict" else "Hmm."
        payload = b"{not json" if action == "garbage" else json.dumps(
            dict(choices=[dict(message=dict(role="assistant", content=content))])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Stub.script, Stub.prompts = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def http_judge(url, **kw):
    return HTTPJudge(url, "stub-model", key="sk-test", timeout=kw.pop("timeout", 5.0), backoff=0.01,
                     workers=kw.pop("workers", 1), **kw)


RECS = [dict(id=f"r{i}", subreddit="relationships", title="t", post=f"post {i}") for i in range(8)]


def test_http_judge_unscrambles_the_random_order(server):
    judge = http_judge(server, workers=4)
    good, bad = [f" a good summary {i}" for i in range(8)], [f" a poor summary {i}" for i in range(8)]
    assert judge.prefer(RECS, good, bad).tolist() == [1.0] * 8
    assert judge.prefer(RECS, bad, good).tolist() == [0.0] * 8
    path, auth, prompt = next(p for p in Stub.prompts if "good summary 0" in p[2])  # requests run in parallel
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert "accuracy" in prompt and "coverage" in prompt and "coherence" in prompt and "post 0" in prompt
    firsts = ["good" in p.split("Summary A:")[1].split("Summary B:")[0] for _, _, p in Stub.prompts]
    assert 0 < sum(firsts) < len(firsts)  # the policy's summary was shown first sometimes, second other times
    assert judge.prefer(RECS[:1], [" same"], [" same"]).tolist() == [0.5] and len(Stub.prompts) == 16  # no request


def test_http_judge_retries_a_malformed_reply_and_a_timeout(server):
    Stub.script = ["garbage", "no-verdict", "slow"]
    judge = http_judge(server, timeout=0.3, retries=3)
    assert judge.prefer(RECS[:1], [" good one"], [" other one"]).tolist() == [1.0]
    assert judge.stats["requests"] == 4 and judge.stats["failures"] == 3
    assert "timed out" in judge.stats["last_error"].lower()


def test_http_judge_gives_no_verdict_when_retries_or_budget_run_out(server, capsys):
    Stub.script = ["500", "500"]
    judge = http_judge(server, retries=1)
    assert np.isnan(judge.prefer(RECS[:1], [" good"], [" bad"])[0])
    judge = http_judge(server, budget=3)
    out = judge.prefer(RECS[:5], [" good"] * 5, [" bad"] * 5)
    assert out[:3].tolist() == [1.0] * 3 and np.isnan(out[3:]).all() and judge.stats["no_verdict"] == 2
    assert "no verdict on 2 of 5" in capsys.readouterr().out


def test_http_judge_stops_on_a_refused_key_or_a_dead_address(server):
    Stub.script = ["401"]
    with pytest.raises(JudgeError, match="401"):
        http_judge(server).prefer(RECS[:1], [" good"], [" bad"])
    dead = http_judge("http://127.0.0.1:9", retries=0, timeout=0.5)  # the discard port: connection refused
    with pytest.raises(JudgeError, match="20 requests in a row"):
        dead.prefer(RECS * 3, [" good"] * 24, [" bad"] * 24)
    with pytest.raises(JudgeError, match="needs a model"):
        HTTPJudge(server, None)


def test_parse_verdict():
    assert parse_verdict("B is shorter.\nPreferred: A") == "A"
    assert parse_verdict("**Preferred:** b") == "B"
    assert parse_verdict(" A. ") == "A"
    assert parse_verdict("Both are fine.") is None


# --- end to end on tiny checkpoints ---

@pytest.fixture(scope="module")
def evaluated(stages, tmp_path_factory):
    root, common = stages
    out = tmp_path_factory.mktemp("eval")
    ppo.main([a if a != str(root / "out") else str(out) for a in common]
             + ["--sft", str(root / "out" / "sft.pt"), "--reward", str(root / "out" / "reward.pt"),
                "--episodes", "64", "--rollout-batch-size", "16", "--minibatch-size", "16", "--micro-batch-size", "8",
                "--lr", "1e-4", "--eval-every", "4", "--eval-n", "8", "--save-every", "2"])
    evaluate.main(["--task", "synth", "--data-dir", str(root / "data"), "--out-dir", str(out), "--policies",
                   str(root / "out" / "sft.pt"), str(out / "ppo.pt"), "--sft", str(root / "out" / "sft.pt"),
                   "--reward", str(root / "out" / "reward.pt"), "--n-posts", "16", "--batch-size", "8", "--sweep",
                   str(out / "ppo_step2.pt"), str(out / "ppo_step4.pt"), "--max-n", "4", "--bon-posts", "8",
                   "--comparisons", str(root / "out" / "comparisons" / "synth_valid.json"), "--show", "3"])
    return out, json.loads((out / "eval.json").read_text())


@pytest.mark.slow
def test_end_to_end_writes_every_output(evaluated):
    out, res = evaluated
    assert res["n"] == 16 and res["judge"] == "gold" and list(res["policies"]) == ["reference", "sft", "ppo"]
    ref, sft_row, ppo_row = (res["policies"][k] for k in ("reference", "sft", "ppo"))
    assert ref["preference"]["mean"] == 0.5 and ref["rouge"]["rougeL"] == pytest.approx(1.0)
    assert sft_row["kl"]["mean"] == pytest.approx(0.0, abs=1e-3)  # the SFT policy against itself
    assert ppo_row["kl"]["mean"] > 0.0
    for row in (sft_row, ppo_row):
        assert 0 <= row["preference"]["mean"] <= 1 and row["preference"]["n"] == 16 and row["length"]["mean"] > 0
        assert {"rouge1", "rouge2", "rougeL"} <= set(row["rouge"]) and 0 <= row["copying"]["mean"] <= 1
        assert "rm_score" in row and {"coverage", "accuracy"} <= set(row["gold"])
    assert set(res["length_controlled"]["preference"]) == {"sft", "ppo"}
    assert [r["name"] for r in res["sweep"]][0] == "sft" and len(res["sweep"]) == 3  # SFT at KL 0, then the two
    for scorer in ("rm", "rouge"):
        curve = res["best_of_n"][scorer]
        assert [r["n"] for r in curve] == [1, 2, 4] and curve[2]["kl"] == pytest.approx(evaluate.bon_kl(4))
    # N = 1 is the same first sample whoever picks; the RM's pick scores at least as high under the RM
    assert res["best_of_n"]["rm"][0]["preference"] == res["best_of_n"]["rouge"][0]["preference"]
    assert res["best_of_n"]["rm"][2]["rm_score"]["mean"] >= res["best_of_n"]["rm"][0]["rm_score"]["mean"]
    agree = res["rm_analysis"]["agreement"]
    assert {"reward model", "ROUGE-L", "length", "copying", "log-prob under SFT",
            "labelers (second opinion)"} <= set(agree)
    assert set(res["probes"]) == set(synth.PERTURBATIONS)
    assert res["probes"]["add_false_fact"]["gold_prefers_original"]["mean"] == 1.0
    page = (out / "eval_samples.md").read_text()
    assert page.count("\n## ") == 3 and "**reference**" in page and "**ppo**" in page


@pytest.mark.slow
def test_plots_are_drawn_with_matplotlib_and_skipped_without(evaluated, tmp_path, monkeypatch, capsys):
    out, res = evaluated
    pytest.importorskip("matplotlib")
    files = evaluate.plot(res, tmp_path)
    assert sorted(f.name for f in files) == ["eval_best_of_n.png", "eval_overoptimization.png", "eval_preference.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert evaluate.plot(res, tmp_path / "none") == []
    assert "matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_input_gets_a_clear_error(stages, tmp_path):
    root, _ = stages
    with pytest.raises(SystemExit):  # argparse: --judge gold has no rubric on the real task
        evaluate.parse_args(["--task", "tldr", "--judge", "gold", "--policies", "x.pt"])
    with pytest.raises(evaluate.CheckpointError, match="reward checkpoint, expected"):
        evaluate.main(["--task", "synth", "--data-dir", str(root / "data"), "--out-dir", str(tmp_path),
                       "--policies", str(root / "out" / "reward.pt"), "--n-posts", "4", "--max-n", "0"])


@pytest.mark.slow
def test_quickstart_ends_with_the_table_of_its_evaluation(evaluated, capsys):
    import quickstart
    out, res = evaluated
    quickstart.summary(out, 0, 11.5, 0.9, [("data", 1.0), ("sft", 200.0), ("reward", 190.0), ("ppo", 170.0),
                                           ("evaluation", 80.0)])
    text = capsys.readouterr().out
    assert "seed 0, 11.5 min, peak memory 0.90 GB" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for name in ("reference", "sft", "ppo"):
        p = res["policies"][name]["preference"]
        assert f"{100 * p['mean']:5.1f} +- {100 * p['stderr']:.1f}" in rows[name]
        assert f"{res['policies'][name]['length']['mean']:.1f}" in rows[name]
    assert f"{res['policies']['ppo']['kl']['mean']:.2f}" in rows["ppo"]
    agree = res["rm_analysis"]["agreement"]
    assert f"held-out accuracy {100 * agree['reward model']['mean']:5.1f}" in text
    assert f"agree with each other {100 * agree['labelers (second opinion)']['mean']:5.1f}" in text


def test_a_summary_that_never_ended_is_scored_as_ppo_scores_it(stages):
    # PPO gives a response without EOS the fixed score -1; evaluation used to append an EOS and ask the RM, so a
    # policy that runs to the length limit looked better than in training. A text the RM cannot read whole (a tiny
    # policy's stray bytes) gets -1 too instead of stopping the evaluation.
    root, _ = stages
    enc = data.get_tokenizer(data.SYNTH_TOKENIZER)
    rm = model_from_checkpoint(load_checkpoint(root / "out" / "reward.pt"))
    records = data.load_split("synth", "valid", root / "data")[:3]
    texts = [data.as_response(r["summary"]) for r in records]
    texts[2] = " " + "word " * 60  # past the 48 tokens the RM reads
    whole = data.score_summaries(rm, records, texts, enc, "synth")
    cut = data.score_summaries(rm, records, texts, enc, "synth", ended=[True, False, True])
    assert cut[0] == pytest.approx(whole[0], abs=1e-5) and cut[1] == -1.0 and abs(whole[1] + 1) > 1e-3
    assert whole[2] == cut[2] == -1.0
