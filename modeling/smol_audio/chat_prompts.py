"""General text chat for the SmolLM2 audio target: what a text-only EAGLE-3 trainer would train on.

The public text trainers train on general chat sets (ShareGPT, UltraChat): requests of every kind,
typed, none of them about the audio. No such set is installable here (no model hub; the PyPI
packages that evaluate chat models ship no prompts), so this module stands in for one: templates of
other kinds than :mod:`modeling.smol_audio.prompts` (comparisons, how-tos, e-mails, lists, rewrites,
arithmetic, code) over their own subjects. It is a stand-in with the shape of a chat set (typed,
varied, longer requests), not a sample of one: the audio-vs-text comparison labels it so.

Splits by a hash of the text, as the spoken prompts: ``train`` (80%) and ``eval`` (20%).
"""

from __future__ import annotations

import hashlib
import itertools

from modeling.smol_audio.prompts import Prompt

PAIRS = (
    ("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("summer", "winter"), ("books", "movies"),
    ("city life", "country life"), ("running", "swimming"), ("email", "phone calls"), ("oceans", "lakes"),
    ("paper books", "e-readers"), ("solar power", "wind power"), ("chess", "checkers"), ("rice", "bread"),
    ("violins", "cellos"), ("renting", "buying a home"), ("laptops", "desktop computers"), ("bees", "wasps"),
    ("frogs", "toads"), ("stars", "planets"), ("rivers", "canals"), ("mountains", "hills"),
    ("butter", "margarine"), ("jogging", "walking"), ("painting", "drawing"), ("poetry", "prose"),
)
PAIR_TEMPLATES = ("Compare {} and {}.", "What is the difference between {} and {}?",
                  "Which is better for a beginner, {} or {}? Explain briefly.")

TASKS = (
    "make pancakes", "change a flat tire", "write a cover letter", "plant a tree", "fold a paper airplane",
    "brew green tea", "clean a laptop screen", "tie a tie", "boil an egg", "start a vegetable garden",
    "learn to juggle", "set up a budget", "make a paper boat", "wash a wool sweater", "prepare for a job interview",
    "build a birdhouse", "make lemonade", "train a puppy to sit", "write a thank-you note", "back up a phone",
    "choose a good melon", "light a campfire safely", "make a smoothie", "sharpen a pencil", "hang a picture",
)
TASK_TEMPLATES = ("How do I {}?", "Give me step-by-step instructions to {}.", "What mistakes should I avoid when I {}?")

PEOPLE = ("my landlord", "a new colleague", "my teacher", "a hotel", "my neighbour", "a customer", "my manager",
          "an old friend", "the city council", "a bookshop")
SUBJECTS = ("a broken heater", "a meeting next week", "a late payment", "a thank-you for their help",
            "a change of address", "a noisy party", "a lost package", "a holiday request")
EMAIL_TEMPLATES = ("Write a short email to {} about {}.", "Draft a polite message to {} about {}.")

LISTS = ("healthy breakfast ideas", "board games for families", "ways to save energy at home", "famous painters",
         "European capitals", "indoor hobbies", "things to pack for a hike", "questions to ask a doctor",
         "names for a pet fish", "fruits rich in vitamin C", "reasons to learn history", "uses for baking soda")
LIST_TEMPLATES = ("List five {}.", "Name three {} and say one thing about each.")

SENTENCES = ("the meeting was moved because the room was not available",
             "our team finished the project two days before the deadline",
             "the weather was bad so the picnic was cancelled",
             "she learned to play the guitar in just one summer",
             "the new library opens at nine every morning",
             "he forgot his umbrella and got wet on the way home",
             "the museum is free for students on sundays",
             "we planted tomatoes and beans in the back garden")
REWRITE_TEMPLATES = ("Rewrite this sentence more formally: {}.", "Make this sentence shorter: {}.",
                     "Turn this into a question: {}.")

NUMBERS = ((12, 7), (45, 38), (9, 14), (120, 35), (6, 8), (250, 125), (17, 23), (64, 16), (81, 9), (33, 67))
MATH_TEMPLATES = ("What is {} plus {}?", "What is {} times {}?", "If I have {} apples and give away {}, "
                  "how many are left?")

FUNCTIONS = ("reverses a string", "checks if a number is even", "returns the largest item in a list",
             "counts the vowels in a word", "adds two numbers", "converts celsius to fahrenheit",
             "removes duplicates from a list", "returns the square of a number")
CODE_TEMPLATES = ("Write a Python function that {}.", "Explain how to write a function that {}.")

SPLITS = {"train": (0, 80), "eval": (80, 100)}


def all_prompts() -> list[Prompt]:
    texts = [t.format(a, b) for t in PAIR_TEMPLATES for a, b in PAIRS]
    texts += [t.format(x) for t in TASK_TEMPLATES for x in TASKS]
    texts += [t.format(p, s) for t in EMAIL_TEMPLATES for p, s in itertools.product(PEOPLE, SUBJECTS)]
    texts += [t.format(x) for t in LIST_TEMPLATES for x in LISTS]
    texts += [t.format(s) for t in REWRITE_TEMPLATES for s in SENTENCES]
    texts += [t.format(a, b) for t in MATH_TEMPLATES for a, b in NUMBERS]
    texts += [t.format(f) for t in CODE_TEMPLATES for f in FUNCTIONS]
    texts = [s[0].upper() + s[1:] for s in texts]
    # "chat-" keeps the ids apart from the spoken prompts' (both are 10 hex digits of a hash)
    return [Prompt("chat-" + hashlib.sha1(s.encode()).hexdigest()[:10], s) for s in texts]


def prompts(split: str) -> list[Prompt]:
    if split not in SPLITS:
        raise ValueError(f"chat split must be one of {list(SPLITS)}, got {split!r}")
    lo, hi = SPLITS[split]
    # in hash order, so the first N of a split mix every kind of request (all_prompts is template-major)
    chosen = [p for p in all_prompts() if lo <= int(p.id.removeprefix("chat-"), 16) % 100 < hi]
    return sorted(chosen, key=lambda p: p.id)
