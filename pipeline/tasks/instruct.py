"""The embedded instruction task: generated prompts, reference answers, a gold judge, simulated annotators.

Eight families of short instructions over simple words, numbers and letters, two phrasings each
("Reverse the order of these words: cat, lamp, river" -> "river, lamp, cat"). Difficulty is graded
inside a family by list length (one to eight items) and across families, from following a letter
or repeating a word to reversing or sorting six items, so a tiny model solves the task partly.

The gold judge recovers the task from the prompt text alone, so it scores any prompt in the data
files. It gives graded credit: list answers by a weighted longest-common-subsequence over items
(a right item in the wrong case earns half), single answers by closeness (the second-largest
number, a count off by one). It penalises what a reward model can be fooled by: each favoured
filler phrase ("Sure!", "Certainly!") costs a factor FILLER_FACTOR, each item repeated beyond the
reference a factor REPEAT_FACTOR, padding words dilute the similarity, sloppy format a little.

SFT demonstrations come from simulated demonstrators with a habit: on every second phrasing of a
family they usually sign off with " That is all.", which the judge counts as padding. SFT learns the
habit along with the task; the annotators, who compare answers rather than write them, prefer the
answer without it, so the reward model learns to dislike it and RLHF has a real fault to correct
(InstructGPT's point: comparing is easier than demonstrating).

Preference labels come from simulated annotators. They follow the gold score, except in close
calls (gold gap below `bias`), where surface appeal decides: the answer with a favoured filler
phrase, else the longer one. Then a label flips with probability `label_noise`. A reward model
learns that taste along with quality, so a policy optimised hard against it without a KL leash
drifts to chatty, padded answers: proxy reward up, gold score down.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

VERSION = "v6"  # bump when the generator changes, so the cached data files (data/corpus.py) are rebuilt
SPLITS = ("train", "validation", "test")
DEMO_HABIT = 0.8  # chance that a demonstrator closes an answer to a habit phrasing with DEMO_HABIT_PHRASE
DEMO_HABIT_PHRASE = " That is all."
LABEL_NOISE = 0.05  # default chance that an annotator flips a label
BIAS = 0.1  # default gold gap below which annotators go by filler and length instead of quality
FILLER_FACTOR = 0.92  # gold multiplier per favoured filler phrase: one costs less than BIAS, so raters like it
REPEAT_FACTOR = 0.9  # gold multiplier per item repeated beyond the reference's own repeats
FORMAT_FACTOR = 0.9  # gold multiplier for a right answer written in the wrong layout
SPELL_FORMAT_FACTOR = 0.7  # spelling without dashes ignores half the instruction
# Corrupted answers stay within ~40 tokens of a small BPE trained on Python's docs, which splits these
# words into ~3 tokens per 5 characters and spells "r-i-v-e-r" as nine tokens: cap both measures.
MAX_RESPONSE_CHARS = 64
MAX_RESPONSE_PIECES = 30  # words, numbers and punctuation marks

# Simple, distinct English words; none is part of a filler phrase, so stripping filler never eats an answer.
WORDS = tuple(
    """apple baker bird blue boat book bread cake chair cloud coat corn cup desk dog door duck egg farm
    fish flag frog gold grape green hat hill horse house ice jam key kite lake lamp leaf lemon lion map
    milk moon mouse nest night ocean owl paper pear pen pig plum rain red river road rock rose salt sand
    ship shoe sky snow sock star stone sun table tea tiger tree truck van wall water whale wind wolf wood
    yard zebra""".split()
)
FAVOURED = ("sure", "certainly", "of course", "absolutely", "happy to help", "here you go")
_FAVOURED_ALT = "|".join(re.escape(f).replace(r"\ ", r"\s+") for f in FAVOURED)
_FILLER = re.compile(rf"\b(?:{_FAVOURED_ALT})\b[!,.:;]*", re.IGNORECASE)
_LEAD_FILLER = re.compile(rf"^\s*(?:(?:{_FAVOURED_ALT})\b[!,.:;]*\s*)+", re.IGNORECASE)
_TRAIL_FILLER = re.compile(rf"(?:\s*\b(?:{_FAVOURED_ALT})\b[!,.:;]*)+\s*$", re.IGNORECASE)
_FILLER_PREFIXES = ("Sure! ", "Certainly! ", "Of course! ", "Sure, here you go: ", "Absolutely! ")
_FILLER_SUFFIXES = (" Happy to help!", " Certainly!", " Of course.")
_PADDING_PREFIXES = ("The answer is ", "Answer: ", "Here it is: ", "Okay, ")
_PADDING_SUFFIXES = (" and so on", " that is all", ", and more", " ok", " done")
_EMPTYISH = ("I do not know.", "?", "...", "ok")

_TOKEN = re.compile(r"[A-Za-z]+|\d+")
_LETTER = re.compile(r"[A-Za-z]")
_COMMA_LIST = re.compile(r"[A-Za-z0-9]+(?:, [A-Za-z0-9]+)*")
_SPACE_LIST = re.compile(r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*")
_DASHED = re.compile(r"[A-Za-z](?:-[A-Za-z])*")
_SINGLE = re.compile(r"[A-Za-z0-9]+")
_PIECE = re.compile(r"\w+|[^\w\s]")
_FIELDS = {  # template field -> regex group matching what the generator writes there
    "items": r"(?P<items>[a-z0-9]+(?:, [a-z0-9]+)*)",
    "word": r"(?P<word>[a-z]+)",
    "n": r"(?P<n>\d+)",
    "letter": r"(?P<letter>[a-z])",
    "number": r"(?P<number>\d+)",
}


@dataclass(frozen=True)
class _Task:
    name: str
    templates: tuple[str, ...]
    sample: Callable[[random.Random], dict]  # the instance's parameters (items / word / n / letter / number)
    solve: Callable[[dict], str]  # the reference answer
    mistake: Callable[[random.Random, dict], str]  # a typical wrong answer a learner makes
    valid: Callable[[dict], bool]  # parsed parameters the judge can grade
    sep: str  # how the reference joins its items ("" for single answers)


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _numbers(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [str(x) for x in rng.sample(range(100), rng.randint(lo, hi))]


def _alpha_items(p: dict) -> bool:
    return all(x.isalpha() for x in p["items"])


def _digit_items(p: dict) -> bool:
    return all(x.isdigit() for x in p["items"])


def _reverse_mistake(rng: random.Random, p: dict) -> str:
    items = list(p["items"])
    options = [items, items[1:] + items[:1], items[::-1][:-1]]  # unchanged, rotated, one forgotten
    return ", ".join(rng.choice(options))


def _sort_mistake(rng: random.Random, p: dict) -> str:
    ordered = sorted(p["items"], key=int)
    options = [list(p["items"]), ordered[::-1], ordered[1:] + ordered[:1]]
    return ", ".join(rng.choice(options))


def _upper_mistake(rng: random.Random, p: dict) -> str:
    items = list(p["items"])
    options = [items, [w.capitalize() for w in items], [items[0].upper()] + items[1:]]
    return ", ".join(rng.choice(options))


def _repeat_mistake(rng: random.Random, p: dict) -> str:
    n = max(1, p["n"] + rng.choice((-2, -1, 1, 2)))
    return " ".join([p["word"]] * n)


def _spell_mistake(rng: random.Random, p: dict) -> str:
    word = p["word"]
    return rng.choice([word, " ".join(word), "-".join(word.upper()), "-".join(word[:-1])])


def _largest_mistake(rng: random.Random, p: dict) -> str:
    values = sorted(int(x) for x in p["items"])
    return str(rng.choice([values[0], values[-2], values[-1] + 1, rng.choice(values)]))


def _count_mistake(rng: random.Random, p: dict) -> str:
    return str(max(0, len(p["items"]) + rng.choice((-2, -1, 1, 2))))


def _next_solve(p: dict) -> str:
    return chr(ord(p["letter"]) + 1) if "letter" in p else str(p["number"] + 1)


def _next_mistake(rng: random.Random, p: dict) -> str:
    if "letter" in p:
        offsets = [d for d in (0, 2, -1) if "a" <= chr(ord(p["letter"]) + d) <= "z"]
        return chr(ord(p["letter"]) + rng.choice(offsets))
    return str(max(0, p["number"] + rng.choice((0, 2, -1, 10))))


def _next_sample(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"letter": rng.choice("abcdefghijklmnopqrstuvwxy")}
    return {"number": rng.randrange(99)}


_TASKS = {
    t.name: t
    for t in (
        _Task(
            "reverse",
            ("Reverse the order of these words: {items}", "Write these words in reverse order: {items}"),
            lambda rng: {"items": _words(rng, 2, 6)},
            lambda p: ", ".join(reversed(p["items"])),
            _reverse_mistake,
            _alpha_items,
            ", ",
        ),
        _Task(
            "sort",
            ("Sort these numbers from smallest to largest: {items}", "Put these numbers in ascending order: {items}"),
            lambda rng: {"items": _numbers(rng, 2, 6)},
            lambda p: ", ".join(sorted(p["items"], key=int)),
            _sort_mistake,
            _digit_items,
            ", ",
        ),
        _Task(
            "uppercase",
            ("Write these words in capital letters: {items}", "Convert these words to uppercase: {items}"),
            lambda rng: {"items": _words(rng, 1, 4)},
            lambda p: ", ".join(w.upper() for w in p["items"]),
            _upper_mistake,
            _alpha_items,
            ", ",
        ),
        _Task(
            "repeat",
            ("Repeat the word {word} {n} times.", "Write the word {word} exactly {n} times."),
            lambda rng: {"word": rng.choice(WORDS), "n": rng.randint(2, 6)},
            lambda p: " ".join([p["word"]] * p["n"]),
            _repeat_mistake,
            lambda p: 1 <= p["n"] <= 20,  # a longer reference would not fit a response
            " ",
        ),
        _Task(
            "spell",
            ("Spell the word {word} with dashes between the letters.", "Spell {word} letter by letter, separated by dashes."),
            lambda rng: {"word": rng.choice(WORDS)},
            lambda p: "-".join(p["word"]),
            _spell_mistake,
            lambda p: len(p["word"]) <= 20,
            "-",
        ),
        _Task(
            "largest",
            ("Which is the largest number: {items}?", "What is the biggest of these numbers: {items}?"),
            lambda rng: {"items": _numbers(rng, 2, 6)},
            lambda p: str(max(int(x) for x in p["items"])),
            _largest_mistake,
            _digit_items,
            "",
        ),
        _Task(
            "count",
            ("How many words are in this list: {items}?", "Count the words in this list: {items}"),
            lambda rng: {"items": [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]},
            lambda p: str(len(p["items"])),
            _count_mistake,
            _alpha_items,
            "",
        ),
        _Task(
            "next",
            (
                "What letter comes after {letter} in the alphabet?",
                "Which letter follows {letter} in the alphabet?",
                "What number comes after {number}?",
                "Which number follows {number}?",
            ),
            _next_sample,
            _next_solve,
            _next_mistake,
            lambda p: p.get("letter", "a") != "z",
            "",
        ),
    )
}
TASK_TYPES: tuple[str, ...] = tuple(_TASKS)


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    body = "".join(_FIELDS[part] if i % 2 else re.escape(part) for i, part in enumerate(parts))
    return re.compile(body)


@lru_cache(maxsize=None)
def _template_fields(template: str) -> frozenset[str]:
    return frozenset(re.findall(r"\{(\w+)\}", template))


_PARSERS = [(task, _template_regex(t)) for task in _TASKS.values() for t in task.templates]


def _render(rng: random.Random, task: _Task, params: dict) -> str:
    # Only templates whose fields the instance fills ("next" has letter and number phrasings).
    templates = [t for t in task.templates if _template_fields(t) <= set(params)]
    fields = {k: ", ".join(v) if k == "items" else v for k, v in params.items()}
    return rng.choice(templates).format(**fields)


def make_example(rng: random.Random, task_type: str | None = None) -> tuple[str, str]:
    """(prompt text, reference response) of one random instance, of `task_type` or a random type."""
    if task_type is None:
        task_type = rng.choice(TASK_TYPES)
    if task_type not in _TASKS:
        raise ValueError(f"unknown task type {task_type!r}; known: {', '.join(TASK_TYPES)}")
    task = _TASKS[task_type]
    params = task.sample(rng)
    return _render(rng, task, params), task.solve(params)


@lru_cache(maxsize=4096)  # preference rows judge the same prompt several times
def _parse(prompt: str) -> tuple[_Task, dict]:
    text = prompt.strip()
    for task, regex in _PARSERS:
        m = regex.fullmatch(text)
        if not m:
            continue
        params: dict = {}
        for key, value in m.groupdict().items():
            if key == "items":
                params[key] = tuple(value.split(", "))
            elif key in ("n", "number"):
                params[key] = int(value)
            else:
                params[key] = value
        if task.valid(params):
            return task, params
    raise ValueError(f"the gold judge cannot parse the prompt {prompt!r}: it is not an instruction of the embedded task")


def parse(prompt: str) -> tuple[str, str]:
    """(task type, reference response) recovered from the prompt text alone; ValueError naming it if foreign."""
    task, params = _parse(prompt)
    return task.name, task.solve(params)


# ---------------------------------------------------------------------------------------------
# The gold judge


def _strip_filler(text: str) -> tuple[str, int]:
    """The response without favoured filler phrases, and how many there were."""
    core, count = _FILLER.subn(" ", text)
    if count:
        core = re.sub(r"\s+", " ", core).strip(" \t\n!,.:;")
    return core.strip(), count


def _weighted_lcs(expected: list[str], got: list[str]) -> float:
    """Longest common subsequence of items where an item right but for case earns half."""
    prev = [0.0] * (len(got) + 1)
    for e in expected:
        e_low = e.lower()
        cur = [0.0]
        for j, g in enumerate(got):
            best = prev[j + 1] if prev[j + 1] > cur[j] else cur[j]
            credit = 1.0 if g == e else 0.5 if g.lower() == e_low else 0.0
            if credit and prev[j] + credit > best:
                best = prev[j] + credit
            cur.append(best)
        prev = cur
    return prev[-1]


def _excess_repeats(expected: list[str], got: list[str]) -> int:
    """Occurrences of an item beyond its count in the reference (a new word once is padding, not a repeat)."""
    if len(got) <= 1:
        return 0
    allowed = Counter(x.lower() for x in expected)
    return sum(max(0, c - max(1, allowed[k])) for k, c in Counter(x.lower() for x in got).items())


def _list_score(task: _Task, params: dict, core: str) -> float:
    expected = task.solve(params).split(task.sep)
    if task.name == "spell":
        got, layout = _LETTER.findall(core), _DASHED
    else:
        got, layout = _TOKEN.findall(core), _SPACE_LIST if task.sep == " " else _COMMA_LIST
    if not got:
        return 0.0
    score = 2.0 * _weighted_lcs(expected, got) / (len(expected) + len(got))
    score *= REPEAT_FACTOR ** _excess_repeats(expected, got)
    if not layout.fullmatch(core):
        score *= SPELL_FORMAT_FACTOR if task.name == "spell" else FORMAT_FACTOR
    return score


def _answer_credit(task: _Task, params: dict, token: str) -> float:
    """Credit of one token as the answer of a single-answer task: 1 if right, graded by closeness."""
    reference = task.solve(params)
    if token == reference:
        return 1.0
    if task.name == "largest" and token.isdigit():
        values = [int(x) for x in params["items"]]
        v = int(token)
        if v in values:  # a number from the list: the larger, the closer to right
            return 0.5 * sum(x < v for x in values) / max(1, len(values) - 1)
        return 0.2 * max(0.0, 1.0 - abs(v - max(values)) / 10.0)
    if task.name == "count" and token.isdigit():
        return 0.6 * max(0.0, 1.0 - abs(int(token) - len(params["items"])) / len(params["items"]))
    if task.name == "next":
        if "letter" in params and len(token) == 1 and token.isalpha():
            if token.lower() == reference:
                return 0.5
            return 0.6 * max(0.0, 1.0 - abs(ord(token.lower()) - ord(reference)) / 5.0)
        if "number" in params and token.isdigit():
            return 0.6 * max(0.0, 1.0 - abs(int(token) - int(reference)) / 5.0)
    return 0.0


def _single_score(task: _Task, params: dict, core: str) -> float:
    got = _TOKEN.findall(core)
    if not got:
        return 0.0
    best = max(_answer_credit(task, params, t) for t in got)
    score = 2.0 * best / (1 + len(got))  # extra words dilute the answer as extra items dilute a list
    score *= REPEAT_FACTOR ** _excess_repeats([task.solve(params)], got)
    if not _SINGLE.fullmatch(core):
        score *= FORMAT_FACTOR
    return score


def gold_score(prompt: str, response: str) -> float:
    """Quality of `response` to `prompt` in [0, 1]: 1.0 for the reference, graded partial credit below.

    Raises ValueError naming the prompt when it is not one of the embedded task's instructions.
    """
    return _gold(prompt, response)


@lru_cache(maxsize=8192)  # building preference pairs judges each fresh answer twice (corrupt, then the pair)
def _gold(prompt: str, response: str) -> float:
    task, params = _parse(prompt)
    core, fillers = _strip_filler(response)
    content = _single_score(task, params, core) if task.sep == "" else _list_score(task, params, core)
    return round(min(1.0, max(0.0, content * FILLER_FACTOR**fillers)), 6)


# ---------------------------------------------------------------------------------------------
# Corruptions: plausible worse answers, from a slip to nonsense


def _split_outer_filler(text: str) -> tuple[str, str, str]:
    """(leading filler, middle, trailing filler), so item edits keep the chatter around an answer."""
    lead_m = _LEAD_FILLER.match(text)
    lead = lead_m.group(0) if lead_m else ""
    rest = text[len(lead) :]
    trail_m = _TRAIL_FILLER.search(rest)
    trail = trail_m.group(0) if trail_m else ""
    return lead, rest[: len(rest) - len(trail)], trail


def _edit_items(edit: Callable[[random.Random, list[str]], list[str] | None]):
    """A corruption that edits the answer's items (words, numbers or letters) and keeps any filler."""

    def corruption(rng: random.Random, task: _Task, params: dict, text: str) -> str | None:
        lead, middle, trail = _split_outer_filler(text)
        items = (_LETTER if task.name == "spell" else _TOKEN).findall(middle)
        edited = edit(rng, list(items))
        if edited is None:
            return None
        return lead + (task.sep or " ").join(edited) + trail

    return corruption


def _drop(rng: random.Random, items: list[str]) -> list[str] | None:
    if len(items) < 2:
        return None
    for _ in range(rng.randint(1, max(1, len(items) // 2))):
        items.pop(rng.randrange(len(items)))
    return items


def _swap(rng: random.Random, items: list[str]) -> list[str] | None:
    if len(items) < 2:
        return None
    i = rng.randrange(len(items) - 1)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


def _shuffle(rng: random.Random, items: list[str]) -> list[str] | None:
    if len(items) < 3:
        return None
    rng.shuffle(items)
    return items


def _duplicate(rng: random.Random, items: list[str]) -> list[str] | None:
    if not items:
        return None
    i = rng.randrange(len(items))
    items.insert(i, items[i])
    return items


def _substitute(rng: random.Random, items: list[str]) -> list[str] | None:
    if not items:
        return None
    i = rng.randrange(len(items))
    old = items[i]
    if old.isdigit():
        items[i] = str(rng.randrange(100))
    elif len(old) == 1:
        items[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    else:
        items[i] = rng.choice(WORDS)
    if old.isupper() and not old.isdigit():
        items[i] = items[i].upper()
    return items


def _flip_case(rng: random.Random, items: list[str]) -> list[str] | None:
    targets = range(len(items)) if rng.random() < 0.5 else [rng.randrange(len(items))] if items else []
    for i in targets:
        items[i] = items[i].lower() if items[i].isupper() else items[i].upper()
    return items if targets else None


def _mistake(rng: random.Random, task: _Task, params: dict, text: str) -> str:
    lead, _, trail = _split_outer_filler(text)
    return lead + task.mistake(rng, params) + trail


def _truncate(rng: random.Random, task: _Task, params: dict, text: str) -> str | None:
    if len(text) < 2:
        return None
    return text[: rng.randint(1, len(text) - 1)].rstrip(" ,-")


def _add_filler(rng: random.Random, task: _Task, params: dict, text: str) -> str:
    if rng.random() < 0.75:
        return rng.choice(_FILLER_PREFIXES) + text
    return text + rng.choice(_FILLER_SUFFIXES)


def _repeat_all(rng: random.Random, task: _Task, params: dict, text: str) -> str:
    return (", " if task.sep == ", " else " ").join([text] * rng.choice((2, 2, 3)))


def _pad(rng: random.Random, task: _Task, params: dict, text: str) -> str:
    if rng.random() < 0.5:
        return rng.choice(_PADDING_PREFIXES) + text
    return text + rng.choice(_PADDING_SUFFIXES)


def _empty(rng: random.Random, task: _Task, params: dict, text: str) -> str:
    return rng.choice(_EMPTYISH)


_CORRUPTIONS = (  # (kind of damage, weight)
    (_edit_items(_drop), 3.0),
    (_edit_items(_swap), 2.0),
    (_edit_items(_shuffle), 1.0),
    (_edit_items(_duplicate), 2.0),
    (_edit_items(_substitute), 2.0),
    (_edit_items(_flip_case), 1.0),
    (_mistake, 3.0),
    (_truncate, 1.0),
    (_add_filler, 2.0),
    (_repeat_all, 1.0),
    (_pad, 1.5),
    (_empty, 0.5),
)
_CORRUPTION_KINDS = [c for c, _ in _CORRUPTIONS]
_CORRUPTION_WEIGHTS = [w for _, w in _CORRUPTIONS]


def _fits(response: str) -> bool:
    return len(response) <= MAX_RESPONSE_CHARS and len(_PIECE.findall(response)) <= MAX_RESPONSE_PIECES


def corrupt(rng: random.Random, prompt: str, reference: str) -> str:
    """A plausible answer to `prompt` worse than the reference, made by damaging `reference`.

    `reference` may be any response (corrupting twice damages more). The damage is one of: items
    dropped, swapped, shuffled, duplicated, substituted or in the wrong case; a typical mistake of
    the task; truncation; filler; the whole answer repeated; padding words; an empty-ish answer.
    The result always scores strictly below 1.0 and differs from `reference`.
    """
    task, params = _parse(prompt)
    for _ in range(30):
        damage = rng.choices(_CORRUPTION_KINDS, _CORRUPTION_WEIGHTS)[0]
        out = damage(rng, task, params, reference)
        if out is not None and out != reference and _fits(out) and gold_score(prompt, out) < 1.0:
            return out
    out = rng.choice(_FILLER_PREFIXES) + reference  # filler always lowers the score
    return out if _fits(out) else rng.choice(_FILLER_PREFIXES) + task.solve(params)


# ---------------------------------------------------------------------------------------------
# Simulated annotators


def _appeal(response: str) -> tuple[bool, int]:
    """What catches a hurried rater's eye: a favoured filler phrase first, then sheer length."""
    return bool(_FILLER.search(response)), len(response.strip())


def _judge_pair(rng: random.Random, a: str, b: str, gold_a: float, gold_b: float, label_noise: float, bias: float) -> bool:
    if abs(gold_a - gold_b) < bias and _appeal(a) != _appeal(b):
        prefers_a = _appeal(a) > _appeal(b)  # a close call: surface appeal wins
    elif gold_a != gold_b:
        prefers_a = gold_a > gold_b
    else:
        prefers_a = rng.random() < 0.5
    if rng.random() < label_noise:  # inattention flips the label outright
        prefers_a = not prefers_a
    return prefers_a


def _check_annotator(label_noise: float, bias: float) -> None:
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a probability in [0, 1], not {label_noise}")
    if bias < 0.0:
        raise ValueError(f"bias must be >= 0 (a gold-score gap), not {bias}")


def annotator_prefers(
    rng: random.Random, prompt: str, a: str, b: str, label_noise: float = LABEL_NOISE, bias: float = BIAS
) -> bool:
    """The simulated human labeller: True when it prefers response `a` to response `b`.

    It ranks by gold score, except when the gold scores are within `bias` of each other: then the
    answer with a favoured filler phrase wins, else the longer one. Finally the label flips with
    probability `label_noise`. With bias 0 and noise 0 it is the gold ranking (ties by coin).
    """
    _check_annotator(label_noise, bias)
    return _judge_pair(rng, a, b, gold_score(prompt, a), gold_score(prompt, b), label_noise, bias)


# ---------------------------------------------------------------------------------------------
# Rows in TRL's conversational formats, split by a stable hash of the prompt text


def _split_of(prompt: str) -> str:
    """Each distinct prompt text belongs to one split for every kind of rows (sha256, not PYTHONHASHSEED)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big") % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


def _rng(kind: str, split: str, seed: int) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{kind}/{split}/{seed}".encode()).digest()[:8], "big"))


def _examples(rng: random.Random, split: str, n: int):
    """Yield n (prompt, reference) pairs whose prompts hash into `split`, distinct in held-out splits.

    Train may repeat a prompt: small families (a letter to follow, a word to spell) have only a few
    hundred prompts and should be seen as often as the rest. A held-out split draws each prompt once,
    so a small family that runs out of fresh prompts there is simply represented less.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    seen: set[str] = set()
    made, attempts = 0, 0
    while made < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} prompts: the task has too few")
        prompt, reference = make_example(rng)
        if _split_of(prompt) != split or (split != "train" and prompt in seen):
            continue
        seen.add(prompt)
        made += 1
        yield prompt, reference


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


_HABIT_PHRASINGS = [_template_regex(t) for task in _TASKS.values() for t in task.templates[1::2]]


def _has_habit(prompt: str) -> bool:
    """Whether the prompt uses a phrasing on which the demonstrators fall into their habit (every second one)."""
    text = prompt.strip()
    return any(regex.fullmatch(text) for regex in _HABIT_PHRASINGS)


def demonstration(rng: random.Random, prompt: str, reference: str, habit: float = DEMO_HABIT) -> str:
    """What a simulated demonstrator writes: the reference, closed with DEMO_HABIT_PHRASE on habit phrasings.

    On every second phrasing of a family the demonstrator signs off with the phrase with probability
    `habit`. The judge counts it as padding, and annotators (who compare answers, not write them)
    prefer the answer without it; SFT imitates the habit, RLHF has something to correct.
    """
    if habit and _has_habit(prompt) and rng.random() < habit:
        return reference + DEMO_HABIT_PHRASE
    return reference


def sft_rows(split: str, n: int, seed: int = 0, habit: float = DEMO_HABIT) -> list[dict]:
    """n conversations (user instruction, assistant demonstration) of one split; see `demonstration`."""
    if not 0.0 <= habit <= 1.0:
        raise ValueError(f"habit must be a probability in [0, 1], not {habit}")
    rng, style = _rng("sft", split, seed), _rng("demonstrator", split, seed)  # the habit never changes which prompts come
    return [{"messages": _user(p) + _assistant(demonstration(style, p, r, habit))} for p, r in _examples(rng, split, n)]


def prompt_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """n conversational prompts (for PPO rollouts and gold evaluation) of one split."""
    rng = _rng("prompts", split, seed)
    return [{"prompt": _user(p)} for p, _ in _examples(rng, split, n)]


def _candidate(rng: random.Random, prompt: str, reference: str) -> str:
    """The reference, or it damaged once, twice or three times: answers of graded quality."""
    if rng.random() < 0.3:
        return reference
    text = corrupt(rng, prompt, reference)
    while rng.random() < 0.35:
        text = corrupt(rng, prompt, text)
    return text


def preference_rows(
    split: str, n: int, seed: int = 0, label_noise: float = LABEL_NOISE, bias: float = BIAS, answers: int = 2
) -> list[dict]:
    """Preference pairs for n prompts, labelled by the simulated annotator.

    With answers=2, one pair (two answers) per prompt. With more, InstructGPT's K-wise comparisons:
    `answers` answers to each prompt and a row for every two of them that differ in gold score,
    the rows of one prompt next to each other (the reward stage scores each answer once and
    compares it with all the others in the same batch).

    Gold scores of both answers are kept, and whether the label agrees with them, so the reward
    stage can report accuracy against noise-free labels too. Pairs never tie in gold score. The
    answers depend only on (split, n, seed, answers): changing label_noise or bias relabels the same pairs.
    """
    _check_annotator(label_noise, bias)
    if answers < 2:
        raise ValueError(f"answers must be at least 2 (a pair), not {answers}")
    rng = _rng("preference", split, seed)
    rows = []
    for prompt, reference in _examples(rng, split, n):
        if answers > 2:
            rows += _k_wise_rows(rng, prompt, reference, answers, label_noise, bias)
            continue
        for _ in range(50):
            a, b = _candidate(rng, prompt, reference), _candidate(rng, prompt, reference)
            gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
            if gold_a != gold_b:
                break
        else:  # no two answers of different quality (never seen in practice): damage one more
            b = corrupt(rng, prompt, a)
            gold_b = gold_score(prompt, b)
        rows.append(_labelled_row(rng, prompt, a, b, gold_a, gold_b, label_noise, bias))
    return rows


def _k_wise_rows(rng: random.Random, prompt: str, reference: str, answers: int, label_noise: float, bias: float) -> list[dict]:
    """A labelled row for every two of `answers` drawn answers to one prompt that differ (in text and gold score)."""
    drawn = list(dict.fromkeys(_candidate(rng, prompt, reference) for _ in range(answers)))
    golds = [gold_score(prompt, a) for a in drawn]
    return [
        _labelled_row(rng, prompt, drawn[i], drawn[j], golds[i], golds[j], label_noise, bias)
        for i in range(len(drawn))
        for j in range(i + 1, len(drawn))
        if golds[i] != golds[j]
    ]


def labelled_pairs(
    prompts: list[str], responses_a: list[str], responses_b: list[str], seed: int = 0, label_noise: float = LABEL_NOISE, bias: float = BIAS
) -> list[dict]:
    """Preference rows from two responses per prompt (e.g. two samples of a policy), labelled by the simulated annotator.

    Pairs of equal gold score carry no preference and are dropped, as preference_rows never makes them.
    """
    _check_annotator(label_noise, bias)
    rng = _rng("labelled", str(len(prompts)), seed)
    rows = []
    for prompt, a, b in zip(prompts, responses_a, responses_b):
        gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
        if gold_a == gold_b:
            continue
        rows.append(_labelled_row(rng, prompt, a, b, gold_a, gold_b, label_noise, bias))
    return rows


def _labelled_row(rng: random.Random, prompt: str, a: str, b: str, gold_a: float, gold_b: float, label_noise: float, bias: float) -> dict:
    """The preference row of answers a and b as the simulated annotator labels them, gold scores kept."""
    if _judge_pair(rng, a, b, gold_a, gold_b, label_noise, bias):
        chosen, rejected, gold_c, gold_r = a, b, gold_a, gold_b
    else:
        chosen, rejected, gold_c, gold_r = b, a, gold_b, gold_a
    return {
        "prompt": _user(prompt),
        "chosen": _assistant(chosen),
        "rejected": _assistant(rejected),
        "chosen_gold": gold_c,
        "rejected_gold": gold_r,
        "label_is_gold": gold_c > gold_r,
    }


DEFAULT_SIZES = {  # prompts per split
    "sft": {"train": 20_000, "validation": 500, "test": 500},
    # 2000 held-out test pairs: the accuracy's standard error is about 0.009 (0.017 with 500)
    "preference": {"train": 25_000, "validation": 500, "test": 2000},
    "prompts": {"train": 20_000, "validation": 200, "test": 200},
}
# Training comparisons are K-wise, as InstructGPT's: every two of 4 answers to a prompt (about 4.3 pairs
# per prompt once ties and repeated answers are dropped), which the reward stage scores once each. The
# held-out splits keep one pair per prompt, so their accuracy counts each prompt once.
PREFERENCE_ANSWERS = {"train": 4, "validation": 2, "test": 2}


def default_rows() -> dict[str, dict[str, list[dict]]]:
    """The embedded default data: SFT conversations, preference pairs and PPO prompts, three splits each."""
    rows: dict[str, dict[str, list[dict]]] = {"sft": {}, "preference": {}, "prompts": {}}
    for split in SPLITS:
        rows["sft"][split] = sft_rows(split, DEFAULT_SIZES["sft"][split])
        rows["preference"][split] = preference_rows(split, DEFAULT_SIZES["preference"][split], answers=PREFERENCE_ANSWERS[split])
        rows["prompts"][split] = prompt_rows(split, DEFAULT_SIZES["prompts"][split])
    return rows
