"""ROUGE (the values of Google's rouge-score package, reimplemented without it) and the paper's copying measure."""
import re
from collections import Counter

import numpy as np


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
