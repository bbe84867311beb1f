"""sample.py: a post from a file, stdin or a split, summarized with the tiny trained stages of conftest.py, as
data.summarize writes it and data.score_summaries scores it."""
import io
import subprocess
import sys

import pytest
import torch

import data
import sample
from support.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

POST = "My sister of 3 weeks yells at me a lot. I like pizza. How do I get her to stop?"


def run(capsys, *argv):
    """sample.main in this process: its return value and the summary lines it printed."""
    out = sample.main([str(a) for a in argv])
    lines = capsys.readouterr().out.splitlines()
    return out, [line for line in lines if line.startswith("[")]


def models(root):
    load = lambda name: model_from_checkpoint(load_checkpoint(root / "out" / name)).eval()  # noqa: E731
    return load("sft.pt"), load("reward.pt"), data.get_tokenizer(data.SYNTH_TOKENIZER)


@pytest.mark.slow
def test_n_summaries_of_a_file_stdin_and_a_split(stages, tmp_path, capsys, monkeypatch):
    root, _ = stages
    post = tmp_path / "post.txt"
    post.write_text(POST)
    (texts, ended, scores), lines = run(capsys, post, "--out-dir", root / "out", "--n", 3)  # default: sft.pt
    assert len(texts) == len(ended) == len(lines) == 3 and scores == [None] * 3
    assert [line.split(" ", 1)[0] for line in lines] == ["[1/3]", "[2/3]", "[3/3]"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(POST + "\n"))
    from_stdin, lines = run(capsys, "-", "--out-dir", root / "out", "--n", 3)
    assert from_stdin[0] == texts and len(lines) == 3  # the same post and seed: the same samples
    _, lines = run(capsys, "--split", "valid", "--index", 3, "--data-dir", root / "data", "--policy",
                   root / "out" / "sft.pt", "--n", 2)
    assert len(lines) == 2


@pytest.mark.slow
def test_temperature_0_prints_what_data_summarize_writes(stages, capsys):
    root, _ = stages
    policy, _, enc = models(root)
    record = data.load_split("synth", "valid", root / "data")[3]
    want = data.summarize(policy, [record], enc, "synth", 0.0)[0]
    (texts, _, _), lines = run(capsys, "--split", "valid", "--index", 3, "--data-dir", root / "data", "--policy",
                               root / "out" / "sft.pt", "--temperature", 0, "--n", 2)
    assert texts == [want, want]
    assert lines[0].endswith(" " + want.strip())


@pytest.mark.slow
def test_reward_printed_is_score_summaries_with_the_no_eos_convention(stages, capsys, monkeypatch):
    root, _ = stages
    policy, rm, enc = models(root)
    record = data.load_split("synth", "valid", root / "data")[5]
    monkeypatch.setitem(data.TASKS["synth"], "response_len", 4)  # most summaries are cut before their EOS
    (texts, ended, scores), lines = run(capsys, "--split", "valid", "--index", 5, "--data-dir", root / "data",
                                        "--policy", root / "out" / "sft.pt", "--reward", root / "out" / "reward.pt",
                                        "--n", 8, "--temperature", 1.0)
    want = data.score_summaries(rm, [record] * 8, texts, enc, "synth", ended=ended)
    assert torch.equal(torch.as_tensor(scores), torch.as_tensor(want))
    assert all(f" reward {s:+.4f}" in line for s, line in zip(want, lines))
    assert not ended.all() and all(s == -1.0 for s, e in zip(scores, ended) if not e)  # PPO's score without EOS
    assert all(" (no EOS) " in line for line, e in zip(lines, ended) if not e)


@pytest.mark.slow
def test_a_long_post_is_cut_as_the_query_rules_cut_it(stages, tmp_path, capsys):
    root, _ = stages
    post = tmp_path / "long.txt"
    post.write_text("\n".join([POST] * 40))
    enc, query_len = data.get_tokenizer(data.SYNTH_TOKENIZER), data.TASKS["synth"]["query_len"]
    want = data.format_query(dict(subreddit="", title="", post="\n".join([POST] * 40)), enc, query_len)
    sample.main([str(post), "--out-dir", str(root / "out")])
    printed = capsys.readouterr().out
    assert printed.startswith(want + f"\n(the post was cut to fit the task's {query_len}-token query)\n")
    assert len(enc.encode_ordinary(want)) <= query_len


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):  # neither a post nor a split
        sample.parse_args([])
    assert "give one post" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="neither ppo.pt nor sft.pt"):
        sample.main(["post.txt", "--out-dir", str(tmp_path)])
    result = subprocess.run([sys.executable, "sample.py", "post.txt", "--policy", str(tmp_path / "missing.pt")],
                            capture_output=True, text=True, cwd=sample.Path(sample.__file__).parent)
    assert result.returncode == 1
    assert result.stderr.startswith("sample.py: error: ") and "missing.pt: no such file" in result.stderr
