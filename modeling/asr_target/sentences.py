"""A written-sentence generator for the trained tiny ASR target: ~300 words, one small grammar.

Sentences are 4-10 words (1.5-4 s of espeak speech), built from templates over word classes, so a
model can learn to transcribe them from a few thousand clips. :func:`split_of` assigns each distinct
sentence to one split by a hash of its text, so the sentences the target was trained on, the
pipeline's training set and the held-out set are disjoint by construction, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

NAMES = ("anna", "ben", "clara", "david", "emma", "frank", "grace", "henry", "iris", "jack", "kate", "leo",
         "maria", "nick", "olivia", "peter", "rosa", "sam", "tina", "victor")
NOUNS = ("dog", "cat", "bird", "horse", "fish", "apple", "bread", "cake", "letter", "book", "table", "chair",
         "window", "door", "garden", "river", "bridge", "train", "boat", "car", "bike", "phone", "lamp", "key",
         "cup", "bottle", "basket", "box", "coat", "hat", "shoe", "bag", "map", "song", "story", "picture",
         "ticket", "flower", "tree", "stone", "road", "house", "shop", "school", "park", "market", "kitchen",
         "office", "beach", "forest", "island", "mountain", "village", "city", "farm", "bell", "clock", "radio",
         "candle", "blanket")
ADJECTIVES = ("red", "blue", "green", "yellow", "black", "white", "small", "big", "old", "new", "warm", "cold",
              "quiet", "loud", "bright", "dark", "happy", "tired", "clean", "heavy", "empty", "tall", "short",
              "soft", "strange", "lovely", "famous", "busy", "lucky", "round")
# (base, past, third person) so every tense template agrees
VERBS = (("open", "opened", "opens"), ("close", "closed", "closes"), ("paint", "painted", "paints"),
         ("carry", "carried", "carries"), ("find", "found", "finds"), ("lose", "lost", "loses"),
         ("buy", "bought", "buys"), ("sell", "sold", "sells"), ("clean", "cleaned", "cleans"),
         ("fix", "fixed", "fixes"), ("wash", "washed", "washes"), ("draw", "drew", "draws"),
         ("bring", "brought", "brings"), ("send", "sent", "sends"), ("hide", "hid", "hides"),
         ("watch", "watched", "watches"), ("follow", "followed", "follows"), ("visit", "visited", "visits"),
         ("move", "moved", "moves"), ("push", "pushed", "pushes"), ("pull", "pulled", "pulls"),
         ("keep", "kept", "keeps"), ("take", "took", "takes"), ("want", "wanted", "wants"),
         ("see", "saw", "sees"), ("like", "liked", "likes"), ("need", "needed", "needs"),
         ("check", "checked", "checks"), ("count", "counted", "counts"), ("drop", "dropped", "drops"))
PLACES = ("in the kitchen", "near the river", "at the market", "in the garden", "on the bridge",
          "behind the house", "at the station", "in the park", "by the window", "under the table",
          "at school", "in the office", "on the beach", "in the forest", "at the farm", "in the village")
TIMES = ("today", "yesterday", "tomorrow", "this morning", "last night", "on monday", "on friday",
         "every day", "at noon", "in the evening", "after dinner", "before lunch", "next week", "at seven")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
PRONOUNS = (("i", "am"), ("we", "are"), ("they", "are"), ("she", "is"), ("he", "is"), ("you", "are"))
ADVERBS = ("slowly", "quickly", "carefully", "quietly", "happily", "again", "together", "alone")


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun == "shelf":
        return "shelves"
    return noun + "s"


def _sentence(r: random.Random) -> str:
    name, noun, noun2 = r.choice(NAMES), r.choice(NOUNS), r.choice(NOUNS)
    adj, adj2 = r.choice(ADJECTIVES), r.choice(ADJECTIVES)
    base, past, third = r.choice(VERBS)
    pron, be = r.choice(PRONOUNS)
    templates = (
        lambda: f"the {adj} {noun} is {r.choice(PLACES)}",
        lambda: f"{name} {past} the {adj} {noun} {r.choice(TIMES)}",
        lambda: f"{name} {past} {r.choice(NUMBERS)} {_plural(noun)} {r.choice(PLACES)}",
        lambda: f"please {base} the {noun} {r.choice(PLACES)}",
        lambda: f"{pron} will {base} the {adj} {noun} {r.choice(TIMES)}",
        lambda: f"{name} {third} the {noun} {r.choice(ADVERBS)}",
        lambda: f"{pron} {be} {adj} {r.choice(TIMES)}",
        lambda: f"the {noun} and the {noun2} are {adj}",
        lambda: f"{name} and {r.choice(NAMES)} {past} a {adj} {noun}",
        lambda: f"can you {base} my {adj2} {noun} {r.choice(TIMES)}",
        lambda: f"there are {r.choice(NUMBERS)} {adj} {_plural(noun)} {r.choice(PLACES)}",
        lambda: f"{pron} {past} the {noun} {r.choice(ADVERBS)} {r.choice(TIMES)}",
    )
    return r.choice(templates)()


def vocabulary() -> list[str]:
    """Every word a sentence can contain (lower case), sorted."""
    words: set[str] = set(NAMES) | set(NOUNS) | {_plural(n) for n in NOUNS} | set(ADJECTIVES) | set(NUMBERS)
    words |= {w for v in VERBS for w in v} | set(ADVERBS) | {w for p in PRONOUNS for w in p}
    for phrase in (*PLACES, *TIMES):
        words |= set(phrase.split())
    words |= {"the", "is", "are", "please", "will", "and", "a", "can", "you", "my", "there"}
    return sorted(words)


SPLITS = ("target", "train", "eval")  # the target's own training, stage 1-3 training, held-out


def split_of(sentence: str) -> str:
    """The split a sentence belongs to: 80% target, 12% train, 8% eval, by a hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:4], "big") % 100
    return "target" if bucket < 80 else "train" if bucket < 92 else "eval"


def sentences(split: str, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences of ``split`` (lower case, no punctuation), in a seeded order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out: list[str] = []
    seen: set[str] = set()
    for text in _stream(seed):
        if text not in seen and split_of(text) == split:
            seen.add(text)
            out.append(text)
            if len(out) == count:
                return out
    raise AssertionError("unreachable: the stream is infinite")


def _stream(seed: int) -> Iterator[str]:
    r = random.Random(f"asr-sentences-{seed}")
    while True:
        yield _sentence(r)


def written(sentence: str) -> str:
    """How a transcript is written: first letter capital, names capitalised, a full stop."""
    words = [w.capitalize() if w in NAMES or (w == "i") else w for w in sentence.split()]
    for day in ("monday", "friday"):
        words = [w.capitalize() if w == day else w for w in words]
    text = " ".join(words)
    end = "?" if sentence.startswith("can you") else "."
    return text[0].upper() + text[1:] + end
