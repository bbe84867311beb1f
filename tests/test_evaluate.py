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
import torch

import data
import evaluate
import ppo
import synth
from model import pick_dtype
from support import eval_report
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.cli import pick_device
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
    lc, fitted, _ = evaluate.length_controlled(wins, ratios)
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


def kl_samples_again(res, path):
    """The samples of a policy's KL column drawn again (each batch from its own seed, so the same tokens), with the
    estimator's value for each (evaluate.sample) and the same log-ratio summed by hand: one forward of the policy and
    one of SFT over the query and response alone (no padding, no KV cache), log-softmax at the KL temperature, summed
    over the response's tokens and its EOS."""
    args = res["args"]
    device = pick_device(args["device"])
    run = evaluate.Run(res["task"], data.get_tokenizer(data.TASKS[res["task"]]["tokenizer"]), args["batch_size"],
                       device, pick_dtype(device, args["dtype"]), args["seed"])
    policy, sft_model = (model_from_checkpoint(load_checkpoint(p)).to(device).eval() for p in (path, args["sft"]))
    drawn = []

    class Recording:  # the policy, keeping each batch's queries and what it sampled after them
        def generate(self, q, *rest, **kw):
            tokens, logp = policy.generate(q, *rest, **kw)
            drawn.append((q, tokens))
            return tokens, logp

    records = data.load_split(res["task"], res["data"], args["data_dir"])[:res["n"]]
    estimated = evaluate.sample(Recording(), records, run, args["kl_temperature"], ref=sft_model)[2]
    pad, by_hand = data.pad_id(run.enc), []
    with torch.no_grad():
        for q, tokens in drawn:
            for query, response in zip(q, tokens[:, q.size(1):]):
                seq = torch.cat([query[query != pad], response[response != pad]])[None]  # the EOS kept, PAD not
                n = int((query != pad).sum())
                logp = [torch.log_softmax(m(seq)[0, n - 1:-1].float() / args["kl_temperature"], -1)
                        .gather(1, seq[0, n:, None]).sum().item() for m in (policy, sft_model)]
                by_hand.append(logp[0] - logp[1])
    return estimated, np.array(by_hand)


@pytest.mark.slow
def test_end_to_end_writes_every_output(evaluated):
    out, res = evaluated
    assert res["n"] == 16 and res["judge"] == "gold" and list(res["policies"]) == ["reference", "sft", "ppo"]
    ref, sft_row, ppo_row = (res["policies"][k] for k in ("reference", "sft", "ppo"))
    assert ref["preference"]["mean"] == 0.5 and ref["rouge"]["rougeL"] == pytest.approx(1.0)
    assert sft_row["kl"]["mean"] == pytest.approx(0.0, abs=1e-3)  # the SFT policy against itself
    # The PPO row's KL is 16 samples of a KL near 0, of either sign (mean -0.023 +- 0.11 under torch 2.13 and 2.14):
    # its sign says nothing. What must hold is what it estimates: each sample's summed log-ratio, checked by hand
    # (a flipped sign, the reference read at another temperature, an EOS left out or a PAD counted all show here).
    estimated, by_hand = kl_samples_again(res, res["policies"]["ppo"]["path"])
    assert ppo_row["kl"] == pytest.approx(evaluate.mean_se(estimated), abs=1e-6) and ppo_row["kl"]["n"] == 16
    np.testing.assert_allclose(estimated, by_hand, rtol=0, atol=1e-3)  # fp32 rounding: ~1e-5 per sample
    assert np.abs(by_hand).max() > 0.05  # the PPO policy moved away from SFT: its log-ratios are not all 0
    for row in (sft_row, ppo_row):
        assert 0 <= row["preference"]["mean"] <= 1 and row["preference"]["n"] == 16 and row["length"]["mean"] > 0
        assert {"rouge1", "rouge2", "rougeL"} <= set(row["rouge"]) and 0 <= row["copying"]["mean"] <= 1
        assert "rm_score" in row and {"coverage", "accuracy"} <= set(row["gold"])
    assert set(res["length_controlled"]["preference"]) == {"sft", "ppo"}
    # figure 5's points in order of their KL: SFT's is ~0, the PPO checkpoints' are as noisy as the row above, so
    # the order is checked against the KLs, not assumed; ppo.pt is step 4's weights, measured from the same seed
    sweep = {r["name"]: r for r in res["sweep"]}
    assert sorted(sweep) == ["ppo_step2", "ppo_step4", "sft"] and len(res["sweep"]) == 3
    assert [r["kl"]["mean"] for r in res["sweep"]] == sorted(r["kl"]["mean"] for r in res["sweep"])
    assert sweep["sft"]["kl"] == sft_row["kl"] and sweep["ppo_step4"]["kl"] == ppo_row["kl"]
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
    files = eval_report.plot(res, tmp_path)
    assert sorted(f.name for f in files) == ["eval_best_of_n.png", "eval_overoptimization.png", "eval_preference.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert eval_report.plot(res, tmp_path / "none") == []
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
                                           ("evaluation", 80.0)], 179.4)
    text = capsys.readouterr().out
    assert "seed 0, 11.5 min on a machine whose fp32 matmul peaks at 179 GFLOP/s, peak memory 0.90 GB" in text
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
    assert cut[0] == pytest.approx(whole[0], abs=1e-5) and cut[1] == -1.0 and whole[1] != -1.0
    assert whole[2] == cut[2] == -1.0


# --- silent faults: inputs and results that once passed without a word ---

def test_a_named_sft_or_reward_that_is_missing_or_a_folder_is_an_error(tmp_path, capsys):
    # Skipped with a line of output, a mistyped --sft or --reward lost the KL, best-of-N or RM columns unnoticed.
    for flag, given, why in (("--sft", tmp_path / "nope.pt", "no such file"), ("--reward", tmp_path, "a directory")):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--task", "synth", "--out-dir", str(tmp_path), "--policies", "x.pt", flag, str(given)])
        assert f"{flag} {given}: {why}" in capsys.readouterr().err
    args = evaluate.parse_args(["--task", "synth", "--out-dir", str(tmp_path), "--policies", "x.pt"])
    assert args.sft == str(tmp_path / "sft.pt")  # the defaults may be missing: main says what it skips


def test_a_lone_surrogate_in_a_post_is_refused_naming_the_file_and_line(tmp_path):
    # JSON's "\ud800" decodes to half a UTF-16 pair, which no UTF-8 file can hold: it passed the reader and stopped
    # evaluate.py at its last step, the write of eval_samples.md, after all the sampling.
    row = dict(id="a", subreddit="r", title="t", post="a post", summary="a summary")
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, post="an emoji \U0001F600")) + "\n")
    assert "\\ud83d\\ude00" in path.read_text()  # a whole pair, escaped: read as the one character it is
    assert data.load_split("tldr", "test", tmp_path)[1]["post"] == "an emoji \U0001F600"
    with open(path, "a") as f:
        f.write(json.dumps(dict(row, post="half \ud800 of a pair")) + "\n")
    with pytest.raises(data.DataError, match=rf"test.jsonl:3: a lone surrogate \\ud800 .* after '.*half '"):
        data.load_split("tldr", "test", tmp_path)
    path.write_bytes(path.read_bytes().replace(b"\\ud800", b"\xed\xa0\x80"))  # the same, as raw bytes
    with pytest.raises(data.DataError, match="test.jsonl:3: invalid UTF-8"):
        data.load_split("tldr", "test", tmp_path)


def test_length_control_of_a_policy_that_never_wins_is_zero():
    # Fitted alone, a policy that never won had its -inf intercept split with the slope by the ridge: one always
    # ~20x longer than the reference read 0.20 (and near 0.5 for longer ones), though it lost every comparison.
    rng = np.random.default_rng(0)
    rambles = np.log(48.0 / rng.integers(2, 4, 64))
    lc, slope, why = evaluate.length_controlled(dict(rambler=np.zeros(64)), dict(rambler=rambles))
    assert lc == dict(rambler=0.0) and slope is None and why == {}
    # beside others: exactly 0 and 1 for never and always, the rest fitted as if those two were not there
    x = rng.normal(0, 0.5, 400)
    fair = (rng.random(400) < 1 / (1 + np.exp(-(0.5 + x)))).astype(float)
    lc, slope, why = evaluate.length_controlled(dict(rambler=np.zeros(64), star=np.ones(64), fair=fair),
                                                dict(rambler=rambles, star=-rambles, fair=x))
    alone = evaluate.length_controlled(dict(fair=fair), dict(fair=x))
    assert lc == dict(rambler=0.0, star=1.0, fair=alone[0]["fair"]) and slope == alone[1] and why == {}
    assert 0.55 < lc["fair"] < 0.7  # sigmoid(0.5) = 0.62: the real fit, not a default
    # no verdicts, or no variation in length to separate the slope from the intercepts: no value, and why
    lc, slope, why = evaluate.length_controlled(dict(same=np.array([1, 0, 0.5, 1.0]), mute=np.full(4, np.nan)),
                                                dict(same=np.full(4, 0.4), mute=np.zeros(4)))
    assert lc == {} and slope is None
    assert "never varies" in why["same"] and "no verdict" in why["mute"]


@pytest.mark.slow
def test_rm_analysis_drops_and_counts_summaries_longer_than_the_rm_reads(stages, tmp_path):
    # --analysis-n 8 with 3 summaries longer than the RM reads stopped the whole evaluation after the sampling
    # (SFT log-probabilities refused them); reward.py drops such pairs and counts them, and so does the analysis now.
    root, _ = stages
    comps = [json.loads(line) for line in
             (root / "out" / "comparisons" / "synth_valid.json").read_text().splitlines()[:8]]
    for c in comps[0:6:2]:
        c["summaries"][1]["text"] = " word" * 60  # 60 tokens or more; the RM reads 48 with the EOS
    data.write_jsonl(tmp_path / "long.json", comps)
    evaluate.main(["--task", "synth", "--data-dir", str(root / "data"), "--out-dir", str(tmp_path), "--policies",
                   str(root / "out" / "sft.pt"), "--sft", str(root / "out" / "sft.pt"), "--reward",
                   str(root / "out" / "reward.pt"), "--n-posts", "4", "--batch-size", "8", "--max-n", "0",
                   "--analysis-n", "8", "--comparisons", str(tmp_path / "long.json"), "--no-plots"])
    a = json.loads((tmp_path / "eval.json").read_text())["rm_analysis"]
    assert a["n"] == 5 and a["dropped_long"] == 3
    assert a["agreement"]["reward model"]["n"] == a["agreement"]["log-prob under SFT"]["n"] == 5
