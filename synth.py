"""The synthetic TL;DR: an offline stand-in for Reddit TL;DR and its human labelers, small enough that the whole RLHF
loop runs on a laptop CPU, with a ground truth that the real task lacks.

    python synth.py --seed 0            # train/valid/test/transfer posts -> data/synth/, prints labeler agreement

The world. Each post asks for advice about one person (a boyfriend, a mom, a roommate), named ("Jake"), who does
something to the poster ("keeps reading my texts"); it says how long they have known each other ("7 months"), what
the poster has tried ("I already asked him to stop"), asks a question ("am I overreacting?") and mentions two
irrelevant details ("we have two cats"). A record is a pure function of its id "{WORLD}_{seed}_{split}_{index}", so
the hidden facts are regenerated from the record alone. Records are written in the tldr_3_filtered format and read by
data.py's readers: every stage has one code path for both tasks. The transfer split has a subreddit, people and
problems never seen in training, and two new questions (the analogue of the paper's CNN/DM transfer, Section 4.2).
All text is ASCII without apostrophes, and data.py's synth tokenizer has one token for each word the world can write
(`world_words`).

The poster. The reference TL;DR is written by a simulated poster with human habits (POSTER): it often leaves out the
name, the duration, what was tried or the question, sometimes adds an irrelevant detail, now and then states
something false. References are beatable, as the paper's are (Section 4.1), and a supervised policy that imitates
them inherits their omissions: the room left for RL.

The gold labeler. `gold_score` is a documented rubric on the paper's axes (coverage, accuracy, coherence) plus a
length budget. A concise summary of the key facts scores 1; stuffing, repeating, copying the post or junk score
less, so over-optimizing a learned reward model (the paper's Section 4.3) shows up as a falling gold score. Four of
the six key facts (the name, the duration, what was tried, the question) must be copied from the post exactly, and a
wrong one is a false statement: the headroom in which bigger models and better methods can be seen to help.

The labelers. Each `Labeler` prefers a summary with Bradley-Terry noise on the gold totals, calibrated so that two
labelers agree about 75% of the time (the paper: 73-77%, Section 3.3), and reports the released data's 9-point
confidence, from the margin it perceives. `data.collect_comparisons` asks them about pairs of summaries and writes
the original comparison format. reward.py's comparisons are SFT samples judged by them (`collect`), collected anew
whenever the SFT model, the collection flags, the rubric or the labelers change (support/synth_comparisons.py).
"""
import argparse
import functools
import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from data import (PAT_ASCII, SYNTH_TOKENIZER, TASKS, TEMPLATES, DataError, as_response, collect_comparisons,
                  format_query, get_tokenizer, load_split, register_synthetic_world, sample_candidates, write_jsonl)
from support.checkpoint import POLICY_STAGES, CheckpointError, load_checkpoint, model_from_checkpoint
from support.cli import SEED_MAX, fraction, nonnegative_float, nonnegative_int, positive_int, seed_int
from support.files import atomic_write

# ----------------------------------------------------------------------------------------------------------------
# the world's tables. Everything is ASCII and free of apostrophes, so each word is one token. Editing them changes
# the world: bump WORLD (and data.SYNTH_TOKENIZER if the set of words changes).

WORLD = "synth3"

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
# The other person's name, which a summary must copy exactly (a wrong name is a false statement), and what the poster
# has tried so far, one of a closed set of acts.
NAMES = dict(M=["Jake", "Mike", "Tom", "Ben", "Ryan", "Matt", "Nick", "Dan", "Luke", "Adam", "Josh", "Kyle"],
             F=["Emma", "Anna", "Kate", "Lisa", "Amy", "Sara", "Mia", "Zoe", "Jess", "Beth", "Lucy", "Rose"])
TRIED = ["asked {him} to stop", "talked to {him} about it", "told {his} family", "tried to ignore it",
         "wrote {him} a letter", "asked a friend for advice"]
TRIED_LINES = ["I already {tried}.", "So far I {tried}.", "I {tried} but nothing changed."]
QUESTIONS = ["what should I do", "how do I get {him} to stop", "am I overreacting", "should I confront {him}",
             "how do I talk to {him} about it", "is this normal"]
TRANSFER_QUESTIONS = ["should I quit", "should I talk to HR"]
DETAILS = ["I work at a bakery", "I just started college", "we have two cats", "I play guitar in a band",
           "we live in a small town", "I am saving for a car", "my favorite food is pizza", "I go to the gym a lot",
           "we met at a concert", "it snowed a lot this winter", "I have a dog named Max", "I love hiking"]
UNITS = ["weeks", "months", "years"]
INTROS = ["I ({a1} {g1}) have known my {rel} {name} ({a2} {g2}) for {dur}.",
          "My {rel} {name} ({a2} {g2}) and I ({a1} {g1}) have been close for {dur}."]
PROBLEM_LINES = ["Lately {he} {vp}.", "The problem is that {he} {vp}.", "Recently {he} {vp}."]
FEELINGS = ["It really hurts.", "I feel awful about it.", "It is driving me crazy.", "I feel lost."]
TITLES = ["Need advice about my {rel}", "My {rel} {vp}", "{Q}?", "Not sure what to do"]
# How the simulated poster writes a TL;DR. The main sentence comes in a short and a long form, with or without the
# duration; {rel} is the relation, with the name after it or not; {act} is "{he} {vp}" or, with roles swapped,
# "I {swap}". "bare" leaves out who the other person is. What was tried follows as "I {tried}.", then the question.
MAIN_FORMS = {("short", True): "My {rel} of {dur} {vp}.", ("short", False): "My {rel} {vp}.",
              ("long", True): "I have known my {rel} for {dur} and {act}.",
              ("long", False): "Me and my {rel} are close but {act}.", ("bare", False): "{Act}."}
# The poster's habits (probabilities). Most references leave out the name, the duration, what was tried or the
# question, some add an irrelevant detail, a few state something false: beatable, like the paper's references, and a
# supervised policy that imitates them at temperature 0 inherits the omissions, which is the room left for RL
# (Section 4.1). Every choice has a clear favourite (after the first sentence, ending is likelier than any one
# addition: 0.8 x 0.7 x 0.7 = 0.39), so what a supervised policy writes at temperature 0 does not hinge on a near tie.
# The name and the duration are rare (synth2 had them in a quarter of the references): a small model seldom sees
# them and does not learn to copy them, so its samples get them wrong, which a small reward model cannot check.
# Then whether PPO adds them was a coin flip between seeds and machines; now no small policy does, and they are
# the headroom that a model able to copy could take (docs/results.md).
POSTER = dict(name=0.1, duration=0.1, tried=0.2, question=0.3, bare=0.12, long=0.3, detail=0.3, wrong=0.15)
# Gold rubric (see gold_score). Coverage weights sum to 1; BUDGET is the synthetic analogue of the 48-token limit.
# AXIS_WEIGHTS weigh the axes in the total: what is said counts twice as much as how it reads.
COVER = dict(rel=0.15, name=0.1, vp=0.3, dur=0.15, tried=0.15, q=0.15)
AXIS_WEIGHTS = dict(coverage=2, accuracy=2, coherence=1, length=1)
DETAIL_COST, FALSE_COST, INCOHERENCE_COST, BUDGET = 0.1, 0.5, 0.25, 36
REFERENCE_WORDS = 30  # so that every reference fits data.TASKS["synth"]["response_len"] with its EOS
LABELER_NOISE = 0.038  # Bradley-Terry temperature on gold totals; calibrated for ~75% labeler-labeler agreement
CONFIDENCE_STEPS = (1.0, 2.0, 3.5)  # perceived margins (in units of the noise) above which a labeler is surer


# ----------------------------------------------------------------------------------------------------------------
# records: a post and its hidden facts, regenerated from the record's id

def _words(text):
    return [p.strip() for p in PAT_ASCII.findall(text) if p.strip()]


def _key(text):
    return tuple(w.lower() for w in _words(text))


def _cap(s):
    return s[:1].upper() + s[1:]


def world_words():
    """Every word the world can write, capitalized or not: the vocabulary of the synthetic tokenizer. It depends only
    on the tables above, never on a seed, so the tokenizer name always rebuilds the same encoding."""
    texts = list(SUBREDDITS) + list(TRANSFER_SUBREDDITS) + sum(SUBREDDITS.values(), [])
    texts += sum(TRANSFER_SUBREDDITS.values(), []) + sum(map(list, PROBLEMS + PARTNER_PROBLEMS + TRANSFER_PROBLEMS), [])
    texts += QUESTIONS + TRANSFER_QUESTIONS + DETAILS + UNITS + INTROS + PROBLEM_LINES + FEELINGS + TITLES
    texts += sum(NAMES.values(), []) + TRIED + TRIED_LINES
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
    tried = rng.choice(TRIED)
    f = dict(rel=rel, name=rng.choice(NAMES[g2]), he=p["he"], vp=vp, swap="I " + swap.format(**p),
             dur=f"{rng.randint(2, 11)} {rng.choice(UNITS)}", tried_id=tried, tried=tried.format(**p), q_id=q,
             q=q.format(**p), details=rng.sample(DETAILS, 2))
    slots = dict(a1=a1, g1=g1, a2=a2, g2=g2, rel=rel, name=f["name"], dur=f["dur"], he=p["he"], vp=vp,
                 Q=_cap(f["q"]), tried=f["tried"])
    first = rng.choice(INTROS).format(**slots) + " " + _cap(f["details"][0]) + "."
    second = [rng.choice(PROBLEM_LINES).format(**slots), rng.choice(TRIED_LINES).format(**slots),
              _cap(f["details"][1]) + "."]
    second += [rng.choice(FEELINGS)] if rng.random() < 0.6 else []
    paragraphs = [first, " ".join(second), _cap(f["q"]) + "?"]
    post = "\n\n".join(paragraphs) if rng.random() < 0.7 else " ".join(paragraphs)
    record = dict(id=record_id, subreddit=subreddit, title=rng.choice(TITLES).format(**slots), post=post,
                  summary=_poster_tldr(f, rng))
    return record, f


def synth_record(seed, split, index):
    """The synthetic record (tldr_3_filtered fields) number `index` of a split: train/valid/test/transfer."""
    return dict(_synth_world(f"{WORLD}_{seed}_{split}_{index}")[0])


def world_of(record_id):
    """The world a synthetic record's id names ("synth1" of "synth1_0_train_7"), any version of it; None for other
    ids (Reddit's "t3_...")."""
    match = re.match(r"(synth\d+)_", str(record_id))
    return match and match.group(1)


def _facts(record):
    world, facts = _synth_world(record.get("id"))
    if world["post"] != record.get("post"):
        raise DataError(f"record {record.get('id')}: its post differs from the synthetic world's (another version?)")
    return facts


_CHECKED = set()  # hashes of the (id, post) pairs check_post passed: a stage reads the train split more than once


def check_post(record):
    """Refuse a record whose post is not the one its id generates (edited by hand, or written by another version of
    the world), as data.py reads it: the gold labeler regenerates the facts from the id (_facts) and would refuse
    it only when it first grades a summary, at the end of a stage. About 20 us a post, once per process."""
    key = hash((record.get("id"), record["post"]))
    if key in _CHECKED:
        return
    world = _synth_world.__wrapped__(record.get("id"))[0]  # uncached: checking every post would flood the cache
    if world["post"] == record["post"]:
        _CHECKED.add(key)
    else:
        at = next((i for i, (a, b) in enumerate(zip(record["post"], world["post"])) if a != b),
                  min(len(record["post"]), len(world["post"])))
        raise DataError(f"post of {record['id']} differs from the synthetic world's {WORLD} from character {at} "
                        f"({record['post'][at:at + 30]!r}, the world has {world['post'][at:at + 30]!r}): edited by "
                        f"hand, or written by another version of synth.py? Restore it or write the data anew "
                        f"(python synth.py)")


register_synthetic_world(WORLD, world_words, check_post)  # data.py's synth tokenizer and readers need them


# ----------------------------------------------------------------------------------------------------------------
# the poster's TL;DRs, and the perfect and perturbed summaries that probe a reward model

def _poster_tldr(f, rng):
    """The poster's TL;DR, at most REFERENCE_WORDS words (the released TL;DRs were filtered by length too): a longer
    one loses its irrelevant detail, then takes the short form."""
    plan = _poster_plan(f, rng)
    for cut in (dict(details=[]), dict(form="short")):
        if len(_words(_render(f, plan))) > REFERENCE_WORDS:
            plan.update(cut)
    return _render(f, plan)


def _poster_plan(f, rng):
    """What the simulated poster puts in a TL;DR (see POSTER)."""
    plan = dict(name=rng.random() < POSTER["name"], dur=rng.random() < POSTER["duration"],
                tried=rng.random() < POSTER["tried"], q=rng.random() < POSTER["question"], details=[], swap=False,
                wrong_dur=None, wrong_name=None)
    plan["form"] = "bare" if not plan["dur"] and not plan["name"] and rng.random() < POSTER["bare"] else (
        "long" if rng.random() < POSTER["long"] else "short")
    if rng.random() < POSTER["detail"]:
        plan["details"].append(rng.choice(f["details"]))
    if rng.random() < POSTER["wrong"]:
        _add_false_fact(f, plan, rng)
    return plan


def _add_false_fact(f, plan, rng):
    kind = rng.choice(["dur", "name", "swap", "detail"])
    if kind == "dur":  # a misremembered number, often the kind of slip a small model makes too
        n, unit = f["dur"].split()
        plan.update(dur=True, form="short" if plan["form"] == "bare" else plan["form"],
                    wrong_dur=f"{int(n) + rng.choice([-1, 1, 2])} {unit}")
    elif kind == "name":  # another name of the same gender, as a copying slip would give
        same_gender = next(names for names in NAMES.values() if f["name"] in names)
        plan.update(name=True, form="short" if plan["form"] == "bare" else plan["form"],
                    wrong_name=rng.choice([n for n in same_gender if n != f["name"]]))
    elif kind == "swap":
        plan.update(swap=True, form="long")
    else:
        plan["details"] = [rng.choice([d for d in DETAILS if d not in f["details"]])]


def _render(f, plan):
    act = f["swap"] if plan["swap"] else f"{f['he']} {f['vp']}"
    main = MAIN_FORMS[(plan["form"], plan["dur"] and plan["form"] != "bare")]
    rel = f"{f['rel']} {plan['wrong_name'] or f['name']}" if plan["name"] else f["rel"]
    text = main.format(rel=rel, dur=plan["wrong_dur"] or f["dur"], vp=f["vp"], act=act, Act=_cap(act))
    text += f" I {f['tried']}." if plan["tried"] else ""
    text += "".join(f" {_cap(d)}." for d in plan["details"])
    return text + (f" {_cap(f['q'])}?" if plan["q"] else "")


FULL_PLAN = dict(form="short", name=True, dur=True, tried=True, q=True, details=[], swap=False, wrong_dur=None,
                 wrong_name=None)


def sample_reference(record, rng):
    """A fresh TL;DR of a synthetic record by the simulated poster (`rng`: random.Random), flaws and all."""
    return _poster_tldr(_facts(record), rng)


def perfect_summary(record):
    """Every key fact, nothing else, in the short form: what the gold labeler likes best."""
    return _render(_facts(record), FULL_PLAN)


PERTURBATIONS = ("drop_fact", "add_false_fact", "wrong_number", "swap_roles", "add_detail", "shorter", "longer")


def perturb_summary(record, kind, rng=None):
    """The record's perfect summary changed in one way, for probing what a reward model has learned (the paper's
    Section 4.3): drop_fact (one key fact left out), add_false_fact (a wrong number, a detail not in the post, or
    the roles swapped), wrong_number (the duration one or two off: only checking it against the post tells),
    swap_roles, add_detail (an irrelevant true detail), shorter (only who and the problem), longer (the same facts
    in the long form: the gold labeler is indifferent, a length-biased model is not)."""
    rng = rng or random.Random(0)
    f = _facts(record)
    plan = dict(FULL_PLAN)
    if kind == "drop_fact":
        plan.update(rng.choice([dict(name=False), dict(dur=False), dict(tried=False), dict(q=False),
                                dict(form="bare", name=False, dur=False)]))
    elif kind == "add_false_fact":
        _add_false_fact(f, plan, rng)
    elif kind == "wrong_number":
        n, unit = f["dur"].split()
        plan["wrong_dur"] = f"{int(n) + rng.choice([-1, 1, 2])} {unit}"
    elif kind == "swap_roles":
        plan.update(swap=True, form="long")
    elif kind == "add_detail":
        plan["details"] = [rng.choice(f["details"])]
    elif kind == "shorter":
        plan.update(name=False, dur=False, tried=False, q=False)
    elif kind == "longer":
        plan["form"] = "long"
    else:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    return _render(f, plan)


# ----------------------------------------------------------------------------------------------------------------
# the gold labeler: parse a summary into the facts it states, then grade it

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
    for name in sum(NAMES.values(), []):
        lex[_key(name)] = ("name", name)
    for tried in TRIED:
        for p in PRONOUNS.values():
            lex[_key("I " + tried.format(**p))] = ("tried", tried)
    sentences = [["DETAIL", "."], ["Q", "?"], ["TRIED", "."]]
    for form in MAIN_FORMS.values():
        for act, rel in itertools.product(("he {vp}", "{swap}"), ("{rel}", "{rel} {name}")):
            s = form.replace("{Act}", "{act}").replace("{act}", act).replace("{rel}", rel).lower()
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
      coverage  = 0.15 who (the relation) + 0.1 their name + 0.3 the problem + 0.15 how long + 0.15 what was
                  tried + 0.15 the question asked (COVER), minus 0.1 for each irrelevant detail of the post (it spends
                  the reader's attention)
      accuracy  = 1 - 0.5 per distinct false statement (wrong person, name, number, problem, attempt, question, a
                  detail not in the post, or the roles swapped)
      coherence = 1 - 0.25 per word pair that no well-formed summary contains (junk words, broken or unfinished
                  sentences) - 0.25 per repeated fact; 0 when nothing is stated
      length    = 1 - (words over BUDGET) / BUDGET, at least 0
      total     = the mean of the four, weighted by AXIS_WEIGHTS
    Stuffing facts, repeating them, copying the post or emitting junk all score below a concise, complete summary."""
    f = _facts(record)
    units = _parse(summary)
    claims = Counter(u for u in units if u[0] not in ("lit", "junk"))
    truth = dict(rel=f["rel"], name=f["name"], vp=f["vp"], dur=f["dur"], tried=f["tried_id"], q=f["q_id"])
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
    total = sum(w * scores[axis] for axis, w in AXIS_WEIGHTS.items()) / sum(AXIS_WEIGHTS.values())
    return dict(total=total, **scores)


def gold_win_rate(records, summaries, baselines=None):
    """How often the gold labeler prefers `summaries` to the references (or `baselines`); a tie counts a half."""
    wins = []
    for i, rec in enumerate(records):
        a = gold_score(rec, summaries[i])["total"]
        b = gold_score(rec, baselines[i] if baselines else rec["summary"])["total"]
        wins.append(1.0 if a > b + 1e-9 else 0.5 if abs(a - b) <= 1e-9 else 0.0)
    return float(np.mean(wins))


# ----------------------------------------------------------------------------------------------------------------
# the simulated labelers

class Labeler:
    """A simulated labeler. It perceives the difference of the gold totals with noise, gold0 - gold1 + noise * L,
    where L is a standard logistic draw, and prefers the summary that looks better: summary 0 with probability
    sigmoid((gold0 - gold1) / noise) (Bradley-Terry), so clear differences are judged reliably and close calls are
    nearly coin flips, as with the paper's labelers. Its confidence comes from the same perceived margin: unsure about
    what looks close, which is where its mistakes are, but never told that it erred."""

    def __init__(self, worker, noise=LABELER_NOISE, seed=0):
        self.worker, self.noise, self.rng = worker, noise, np.random.default_rng(seed)

    def compare(self, record, text0, text1):
        """-> (choice, confidence): confidence on the released data's 9-point scale, 1-4 = summary 0 preferred
        (1 surest), 6-9 = summary 1 (9 surest); 5 is never used. Sureness 1-4 grows with the perceived margin in
        units of the labeler's noise (CONFIDENCE_STEPS)."""
        diff = gold_score(record, text0)["total"] - gold_score(record, text1)["total"]
        u = self.rng.random()
        perceived = diff + self.noise * (math.log((1 - u) / u) if u > 0 else math.inf)  # logistic, by inversion
        choice = int(perceived < 0)
        strength = 1 + sum(abs(perceived) > step * self.noise for step in CONFIDENCE_STEPS)
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


def second_opinion_agreement(comparisons, labelers, rng):
    """The ceiling a reward model is measured against (Section 4.1): on these comparisons (as read_comparisons
    returns them), how often a second, different labeler makes the same choice. Returns (agreement, its standard
    error). `rng` is a random.Random."""
    same = []
    for comp in comparisons:
        other = rng.choice([x for x in labelers if x.worker != comp["worker"]])
        rec = dict(id=comp["id"], post=comp["post"])
        same.append(other.compare(rec, *comp["summaries"])[0] == comp["choice"])
    p = float(np.mean(same))
    return p, math.sqrt(p * (1 - p) / len(same))


def collect(policies, records, enc, labelers, rng, samples=2, temperature=0.7, ref_fraction=0.25, split="train",
            batch="synth_sft", **sampling):
    """Step 1 with the simulated labelers: `samples` summaries per post from each policy ({name: model}), at a
    temperature that gives variety, paired mostly with each other plus some references (ref_fraction), judged by
    random labelers. Pairing every sample with its reference instead teaches a reward model the style gap more than
    quality (measured: 65% held-out accuracy against 76% labeler agreement). sampling: batch_size, device, dtype,
    generator for data.summarize. Returns comparison dicts in the original format, policies named."""
    candidates = sample_candidates(policies, records, enc, "synth", samples, temperature, **sampling)
    return collect_comparisons(records, candidates, labelers, rng, ref_fraction, 1, split, batch)


# ----------------------------------------------------------------------------------------------------------------
# the files

def write_synth(out_dir, seed=0, sizes=None, n_labelers=10):
    """Write the synthetic splits in the tldr_3_filtered format and a synth.json with the world's statistics."""
    sizes = sizes or dict(train=20000, valid=1000, test=1000, transfer=1000)
    out_dir, stats = Path(out_dir), dict(seed=seed, world=WORLD, tokenizer=SYNTH_TOKENIZER, sizes=sizes)
    splits = {s: [synth_record(seed, s, i) for i in range(n)] for s, n in sizes.items()}
    for split, records in splits.items():
        write_jsonl(out_dir / TASKS["synth"]["files"][split], records)
    enc, valid = get_tokenizer(SYNTH_TOKENIZER), splits["valid"] or splits["train"]
    q_lens = [len(enc.encode_ordinary(format_query(r, enc, 10**9))) for r in valid]
    s_lens = [len(enc.encode_ordinary(as_response(r["summary"]))) + 1 for r in valid]  # + EOS
    labelers = make_labelers(n_labelers, seed)
    stats.update(vocab=enc.n_vocab, query_tokens=[int(np.mean(q_lens)), max(q_lens)],
                 response_tokens=[int(np.mean(s_lens)), max(s_lens)],
                 gold_reference=round(float(np.mean([gold_score(r, r["summary"])["total"] for r in valid])), 4),
                 gold_perfect=round(float(np.mean([gold_score(r, perfect_summary(r))["total"] for r in valid])), 4),
                 perfect_vs_reference=round(gold_win_rate(valid, [perfect_summary(r) for r in valid]), 4),
                 labelers=[x.worker for x in labelers],
                 agreement=round(labeler_agreement(valid, labelers, random.Random(seed)), 4))
    atomic_write(out_dir / "synth.json", json.dumps(stats, indent=1) + "\n")
    return stats



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=TASKS["synth"]["data_dir"], help="where to write the splits")
    parser.add_argument("--seed", type=seed_int, default=0, help=f"world seed, 0 to {SEED_MAX} (the tokenizer does "
                        "not depend on it)")
    parser.add_argument("--n-train", type=positive_int, default=20000, help="training posts")
    parser.add_argument("--n-valid", type=nonnegative_int, default=1000, help="validation posts (0: the statistics "
                        "come from the training posts)")
    parser.add_argument("--n-test", type=nonnegative_int, default=1000, help="test posts")
    parser.add_argument("--n-transfer", type=nonnegative_int, default=1000, help="posts from the held-out subreddit "
                        "and problems")
    parser.add_argument("--labelers", type=positive_int, default=10, help="simulated labelers")
    sub = parser.add_subparsers(dest="command", help="without a command: generate the splits")
    co = sub.add_parser("collect", help="the paper's step 1: compare samples of policy checkpoints (and references) "
                        "with the simulated labelers, written in the original comparison format")
    co.add_argument("policies", nargs="+", help="sft.pt / ppo.pt checkpoints; each is named by its file name")
    co.add_argument("--out", required=True, help="the comparisons file to write (JSON lines)")
    co.add_argument("--data-dir", default=TASKS["synth"]["data_dir"], help="the synthetic splits")
    co.add_argument("--split", default="valid", choices=["train", "valid", "test", "transfer"], help="posts to use")
    co.add_argument("--n-posts", type=positive_int, default=500, help="posts, one comparison each")
    co.add_argument("--samples", type=positive_int, default=2, help="samples per post and policy")
    co.add_argument("--temperature", type=nonnegative_float, default=0.7, help="sampling temperature (0: the most "
                    "likely tokens, one summary per policy)")
    co.add_argument("--ref-fraction", type=fraction, default=0.25, help="fraction of pairs with the reference (0 to 1)")
    args = parser.parse_args()
    if args.command == "collect":
        return collect_command(args)
    t0 = time.time()
    stats = write_synth(args.out_dir, args.seed, dict(train=args.n_train, valid=args.n_valid, test=args.n_test,
                                                      transfer=args.n_transfer), args.labelers)
    print(f"synth: wrote {args.out_dir} in {time.time() - t0:.1f}s | tokenizer {SYNTH_TOKENIZER} vocab {stats['vocab']}"
          f" | query tokens mean/max {stats['query_tokens']} | reference tokens {stats['response_tokens']}"
          f" | gold: reference {stats['gold_reference']:.3f}, perfect {stats['gold_perfect']:.3f}")
    print(f"synth: labeler-labeler agreement {stats['agreement']:.1%} (paper: 73-77%) | gold prefers a perfect summary "
          f"to the reference {stats['perfect_vs_reference']:.1%} of the time")


def collect_command(args):
    policies = {}
    for path in args.policies:
        ckpt = load_checkpoint(path, stage=POLICY_STAGES, task="synth", tokenizer=SYNTH_TOKENIZER)
        policies[Path(path).stem] = model_from_checkpoint(ckpt).eval()
    posts = load_split("synth", args.split, args.data_dir)[:args.n_posts]
    comps = collect(policies, posts, get_tokenizer(SYNTH_TOKENIZER), make_labelers(args.labelers, args.seed),
                    np.random.default_rng(args.seed), args.samples, args.temperature, args.ref_fraction,
                    split="train" if args.split == "train" else "valid2", batch=Path(args.out).stem)
    write_jsonl(args.out, comps)
    print(f"synth: wrote {len(comps)} comparisons of {', '.join(policies)} and the references to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, ValueError, OSError) as e:
        sys.exit(f"synth.py: error: {e}")
