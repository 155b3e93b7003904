"""A deterministic set of COCO-like captions for the caption-metric tests.

Sentences are built from templates with a seeded generator and mix what real captions and model outputs
contain: casing, sentence-final and inner punctuation, contractions and possessives, hyphenated words,
numbers (integers, decimals, thousands, times, fractions), quotes, parentheses, abbreviations, slashes,
stray spaces and repeated words. Candidates are perturbed references (word swaps, drops, repeats), so
the scores spread over the whole range instead of sitting at 0 or 1.
"""

from __future__ import annotations

import random

SUBJECTS = [
    "a man",
    "A woman",
    "two dogs",
    "the cat",
    "A young girl",
    "an old man's dog",
    "three people",
    "a group of kids",
    "The chef",
    "a black-and-white cat",
    "a 2-year-old boy",
    "Mr. Smith",
    "Dr. Who",
    "a baseball player",
    "the U.S. team",
    "a tennis-player",
    "someone's bike",
    "A giraffe",
    "some zebras",
    "a woman in a red/white dress",
    "The bus",
    "a double-decker bus",
    "two men (brothers)",
]
VERBS = [
    "is sitting on",
    "is standing next to",
    "are playing with",
    "can't reach",
    "isn't eating",
    "rides",
    "is holding",
    "looks at",
    "won't leave",
    "is jumping over",
    "stands near",
    "is cutting",
    "they're near",
    "is parked in front of",
    "sits by",
    "walks past",
    "doesn't like",
    "throws",
    "is flying over",
]
OBJECTS = [
    "a wooden bench",
    "the kitchen table",
    "a frisbee",
    "a pizza with 3 toppings",
    "a 1,000-piece puzzle",
    "a large pizza",
    "an umbrella",
    "the red car",
    'a sign that says "STOP"',
    "a laptop",
    "the ocean",
    "a plate of food",
    "a bowl of fruit",
    "a snowy hill",
    "a fire hydrant",
    "a clock showing 10:30",
    "a field of grass",
    "the train station",
    "a cup of coffee",
    "a 3.5 ft fence",
    "a sign reading 'open'",
    "a TV",
    "an AT&T store",
    "a T-shirt",
    "the kids' toys",
    "a McDonald's sign",
    "an x-ray",
    "a 5'10\" man",
    "a cake with 1/2 eaten",
    "the St. Louis arch",
    "a busy street",
    "a dog's toy",
    "some cows",
]
ENDINGS = [
    "",
    ".",
    " .",
    "!",
    "?",
    "...",
    ". ",
    " ",
    ";",
    ",",
    " - outside",
    " -- at night",
    " at 5 p.m. sharp",
    " (at noon)",
    " at 5 p.m.",
    " :)",
]
ADVERBS = ["", "", "", "quickly", "outside", "together", "in the rain", "at night", "on a sunny day"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    adverb = rng.choice(ADVERBS)
    if adverb:
        words.append(("," if rng.random() < 0.3 else "") + " " + adverb)
        words[-1] = words[-1].lstrip() if not words[-1].startswith(",") else words[-1]
    text = " ".join(words).replace(" ,", ",")
    roll = rng.random()
    if roll < 0.15:
        text = text.upper()
    elif roll < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.1:
        text = "  " + text.replace(" ", "  ", 1)
    return text + rng.choice(ENDINGS)


def _perturb(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.randint(0, 3)):
        action = rng.random()
        i = rng.randrange(len(words))
        if action < 0.35 and len(words) > 3:
            del words[i]
        elif action < 0.7:
            words[i] = rng.choice(["a", "the", "dog", "man", "red", "sitting", "on", "of", "with"])
        else:
            words.insert(i, words[i])
    return " ".join(words)


def caption_set(n_images: int = 220, seed: int = 0) -> tuple[dict[str, list[str]], dict[str, str]]:
    """References (3 to 5 per image) and one candidate per image, keyed by string ids."""
    rng = random.Random(seed)
    references: dict[str, list[str]] = {}
    candidates: dict[str, str] = {}
    for i in range(n_images):
        refs = [_sentence(rng) for _ in range(rng.randint(3, 5))]
        key = f"img{i:04d}"
        references[key] = refs
        roll = rng.random()
        if roll < 0.1:
            candidates[key] = refs[0]  # an exact copy
        elif roll < 0.2:
            candidates[key] = _sentence(rng)  # unrelated
        else:
            candidates[key] = _perturb(rng, rng.choice(refs))
    return references, candidates
