"""Spoken instructions for the SmolLM2 audio target: questions and requests over a few hundred topics.

Each prompt is a template filled with a topic ("What is a volcano?", "Give me three tips for saving
money."). A prompt's split comes from a hash of its text, so the three uses never share a prompt:

| split | share | used by |
|---|---|---|
| ``target`` | 70% | training the target's encoder (:mod:`modeling.smol_audio.train`) |
| ``train`` | 20% | the pipeline's stage 1 (the draft's training answers) |
| ``eval`` | 10% | held-out benchmark: prompts neither the target nor the draft ever heard |
| ``target+train`` | 90% | a draft's stage 1 with every prompt the benchmark does not hold out (more distinct answers) |
| ``more`` | 90% of :func:`more_prompts` | a draft's stage 1 with prompts in other words than any of the above (added after the target was trained) |

Topics are shared between splits (a held-out prompt may ask something new about a known topic); the
words and the answers differ.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

THINGS = (
    "a volcano", "an earthquake", "a rainbow", "a hurricane", "a tornado", "a glacier", "a desert",
    "a rainforest", "the ocean", "a coral reef", "the moon", "the sun", "a black hole", "a comet",
    "the solar system", "the milky way", "a star", "gravity", "electricity", "magnetism", "light",
    "sound", "photosynthesis", "evolution", "the water cycle", "climate change", "the weather", "a cloud",
    "snow", "thunder", "a river", "a mountain", "an island", "a cave", "a waterfall", "a lake", "the wind",
    "a forest", "a tree", "a flower", "a bee", "an ant", "a butterfly", "a spider", "a dolphin", "a whale",
    "a shark", "an octopus", "a penguin", "an elephant", "a giraffe", "a lion", "a tiger", "a horse",
    "a dog", "a cat", "an owl", "an eagle", "a frog", "a snake", "a turtle", "a dinosaur", "a bat",
    "a computer", "the internet", "a smartphone", "a robot", "artificial intelligence", "a battery",
    "a car", "a bicycle", "a train", "an airplane", "a rocket", "a ship", "a bridge", "a skyscraper",
    "a clock", "a camera", "a telescope", "a microscope", "a magnet", "a light bulb", "a refrigerator",
    "a television", "a radio", "a printer", "a keyboard", "a calculator", "a map", "a compass",
    "bread", "cheese", "chocolate", "coffee", "tea", "rice", "pasta", "pizza", "soup", "an apple",
    "a banana", "an orange", "a tomato", "a potato", "honey", "milk", "an egg", "salt", "sugar",
    "water", "the heart", "the brain", "the lungs", "the skin", "a bone", "blood", "sleep", "exercise",
    "a vitamin", "a virus", "a vaccine", "a hospital", "a doctor", "a teacher", "a library", "a museum",
    "a school", "a university", "a farm", "a city", "a village", "a market", "a bank", "money",
    "a job", "a book", "a poem", "a story", "a song", "music", "a piano", "a guitar", "a drum", "a violin",
    "painting", "dance", "a movie", "a game", "chess", "football", "basketball", "tennis", "swimming",
    "the olympics", "a holiday", "a birthday", "a wedding", "a family", "a friend", "a neighbor",
    "kindness", "patience", "courage", "honesty", "happiness", "friendship", "time", "history",
    "mathematics", "science", "geography", "a language", "writing", "reading", "a newspaper",
    "a letter", "the post office", "a garden", "a park", "a beach", "a castle", "a pyramid",
    "ancient egypt", "ancient rome", "the printing press", "the wheel", "fire", "paper", "glass",
    "plastic", "metal", "gold", "iron", "wood", "a diamond", "oil", "a windmill", "solar power",
    "recycling", "pollution", "a city bus", "traffic", "a road", "a tunnel", "a lighthouse",
    "a farmer", "a chef", "a pilot", "an astronaut", "a scientist", "an artist", "a firefighter",
    "a police officer", "a nurse", "a carpenter", "an engineer", "a journalist", "a teacher's day",
    "a calendar", "a week", "the seasons", "winter", "summer", "spring", "autumn", "the night sky",
)

ACTIVITIES = (
    "saving money", "learning to cook", "staying healthy", "sleeping better", "learning a language",
    "studying for an exam", "writing an essay", "making friends", "keeping a garden", "running a mile",
    "reading more books", "waking up early", "drinking more water", "staying focused", "public speaking",
    "learning to swim", "riding a bicycle", "taking better photos", "planning a trip", "packing a suitcase",
    "cleaning the kitchen", "organizing a desk", "baking bread", "making a salad", "caring for a dog",
    "caring for a cat", "growing tomatoes", "learning the piano", "playing chess", "writing a poem",
    "drawing a portrait", "managing time", "reducing stress", "being more patient", "working from home",
    "preparing for an interview", "writing a letter", "learning to code", "starting a small business",
    "teaching a child to read", "staying safe online", "choosing a laptop", "buying a used car",
    "hiking in the mountains", "camping in the woods", "eating less sugar", "walking every day",
    "keeping a journal", "remembering names", "learning math", "giving a toast", "hosting a dinner",
    "decorating a room", "recycling at home", "saving energy at home", "staying warm in winter",
    "staying cool in summer", "making coffee", "brewing tea", "building a birdhouse", "painting a wall",
    "fixing a flat tire", "learning to dance", "singing in a choir", "training for a race",
    "doing yoga", "meditating", "stretching after exercise", "writing a short story", "telling a joke",
)

THING_TEMPLATES = (
    "What is {}?", "Tell me about {}.", "Give me three facts about {}.", "Write two sentences about {}.",
    "Explain {} to a child.", "Why is {} important?", "Describe {} in one sentence.",
    "Write a short poem about {}.",
)
ACTIVITY_TEMPLATES = ("Give me three tips for {}.", "What are the benefits of {}?", "How do I get started with {}?")
TRANSCRIBE = "Transcribe the audio."
# espeak-ng speeds (words a minute) of every clip of this target: brisk speech keeps a question at
# ~2 s, 50 audio tokens, which is what a training step through the frozen 30-layer LLM costs most on
WPM_RANGE = (160, 240)
SPLITS = {"target": (0, 70), "train": (70, 90), "eval": (90, 100)}


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def _filled(thing_templates: tuple[str, ...], activity_templates: tuple[str, ...]) -> list[Prompt]:
    """Templates x topics, template-major, each prompt's id a hash of its text."""
    texts = [t.format(x) for t in thing_templates for x in THINGS]
    texts += [t.format(a) for t in activity_templates for a in ACTIVITIES]
    texts = [s[0].upper() + s[1:] for s in texts]
    return [Prompt(hashlib.sha1(s.encode()).hexdigest()[:10], s) for s in texts]


def all_prompts() -> list[Prompt]:
    """Every prompt, in a fixed order (templates x topics)."""
    return _filled(THING_TEMPLATES, ACTIVITY_TEMPLATES)


def split_of(prompt: Prompt) -> str:
    bucket = int(prompt.id, 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


# Question forms added after the listening target was trained (run 4), for a draft's stage 1 past the 1,828
# prompts above: the same topics in other words, ~1,800 more distinct prompts. Kept out of all_prompts so
# that the target's splits and the benchmark's held-out `eval` prompts stay what they were.
MORE_THING_TEMPLATES = (
    "What do you know about {}?", "Tell me something interesting about {}.", "Write a short story about {}.",
    "What would a child ask about {}?", "List three words that describe {}.", "How would you explain {} to a friend?",
    "What is the history of {}?", "Write a riddle about {}.",
)
MORE_ACTIVITY_TEMPLATES = ("What is the hardest part of {}?", "Write a short plan for {}.", "Why do people enjoy {}?")


def more_prompts() -> list[Prompt]:
    """The added question forms' prompts outside the `eval` hash bucket (which keeps the benchmark's
    held-out prompts the only ones no stage ever trains on), in hash order."""
    chosen = _filled(MORE_THING_TEMPLATES, MORE_ACTIVITY_TEMPLATES)
    return sorted((p for p in chosen if split_of(p) != "eval"), key=lambda p: p.id)


DRAFT_SPLITS = ("target+train", "more")  # `eval` never joins one


def prompts(split: str) -> list[Prompt]:
    """The prompts of one split, in the fixed order; a joined split in hash order, so that its first N
    mix every template (``all_prompts`` is template-major)."""
    if split == "more":
        return more_prompts()
    if split in DRAFT_SPLITS:
        return sorted((p for part in split.split("+") for p in prompts(part)), key=lambda p: p.id)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS) + list(DRAFT_SPLITS)}, got {split!r}")
    return [p for p in all_prompts() if split_of(p) == split]


def names_topic(prompt_text: str, answer: str) -> bool:
    """Whether ``answer`` names the prompt's topic: its last word's first five letters ("glacier" ->
    "glaci"), a rough check that the answer is about what was asked, for a target that may not listen."""
    topic = re.sub(r"[^a-z ]", "", prompt_text.lower()).split()[-1]
    return topic[:5] in answer.lower()
