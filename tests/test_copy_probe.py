"""tools/copy_probe.py: the share of the right token among the tokens of its kind is what tells copying from a
guess, so it is checked on two stand-in models whose answer is known exactly."""
import importlib.util
from pathlib import Path

import pytest
import torch

import data
import synth

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("copy_probe", ROOT / "tools" / "copy_probe.py")
copy_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(copy_probe)


@pytest.fixture(scope="module")
def setup():
    enc = data.get_tokenizer(data.SYNTH_TOKENIZER)
    records = [synth.synth_record(0, "valid", i) for i in range(40)]
    return enc, records


def stand_in(enc, mass):
    """A 'model' whose next-token logits put probability `mass(tokens)` (a dict token -> p) on a few tokens and the
    rest spread thinly over the vocabulary."""
    def model(batch):
        chosen = mass(batch[0].tolist())
        rest = (1 - sum(chosen.values())) / (enc.n_vocab - len(chosen))
        logits = torch.full((1, batch.shape[1], enc.n_vocab), float(torch.log(torch.tensor(rest))))
        for token, p in chosen.items():
            logits[0, -1, token] = torch.log(torch.tensor(p))
        return logits
    return model


def test_a_model_that_guesses_uniformly_gets_chance(setup):
    enc, records = setup
    names = [enc.encode_ordinary(" " + n)[0] for n in copy_probe.KINDS["name"]]
    guess = stand_in(enc, lambda tokens: {t: 0.5 / len(names) for t in names})  # half the mass on names, uniform
    prob, share, top = copy_probe.probe(guess, enc, records, copy_probe.PROBES["name"], copy_probe.KINDS["name"])
    assert share == pytest.approx(1 / 24, rel=1e-4)
    assert prob == pytest.approx(0.5 / 24, rel=1e-3)


def test_a_model_that_copies_the_name_from_the_post_gets_nearly_all_of_the_share(setup):
    enc, records = setup
    names = {enc.encode_ordinary(" " + n)[0] for n in copy_probe.KINDS["name"]}

    def copy(tokens):  # the first name in the post, at 10% probability: rarely written, always right
        return {next(t for t in tokens if t in names): 0.1}
    prob, share, top = copy_probe.probe(stand_in(enc, copy), enc, records, copy_probe.PROBES["name"],
                                        copy_probe.KINDS["name"])
    rest = 0.9 / (enc.n_vocab - 1)  # what each of the other 23 names gets from the spread-out rest
    assert share == pytest.approx(0.1 / (0.1 + 23 * rest), rel=1e-4)  # 0.86, where guessing the gender gets 1/12
    assert prob == pytest.approx(0.1, rel=1e-3)
    assert top == 1.0  # 10% on one token beats the rest, spread over the vocabulary
