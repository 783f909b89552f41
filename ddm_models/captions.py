"""Captions for the digit data sets, derived from labels.

Training draws one of several templates per image (words and numerals), so the text encoder sees
varied phrasing; evaluation asks every digit with one canonical prompt, `prompt_for_digit`, which is
also one of the training templates.
"""

from __future__ import annotations

import re

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CANONICAL_TEMPLATE = "the digit {numeral}"

# `{word}` is the digit's English name, `{numeral}` its numeral; the canonical template comes first.
TEMPLATES = (
    CANONICAL_TEMPLATE,
    "a handwritten {word}",
    "the digit {word}",
    "digit {numeral}",
    "number {numeral}",
    "number {word}, handwritten",
    "a {numeral} written by hand",
    "a handwritten digit {numeral}",
    "the number {word}",
    "a picture of the digit {word}",
    "{word}",
    "a scanned handwritten {numeral}",
)

_TOKEN = re.compile(r"[a-z]+|\d+")
_WORD_TO_DIGIT = {word: digit for digit, word in enumerate(DIGIT_WORDS)}


def _check_digit(label: int) -> int:
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"a digit label is in 0..9, got {label}")
    return label


def caption_templates(label: int) -> list[str]:
    """Every caption a digit label can get, canonical prompt first."""
    label = _check_digit(label)
    return [template.format(word=DIGIT_WORDS[label], numeral=label) for template in TEMPLATES]


def all_captions() -> list[str]:
    """Every caption of every digit (10 x len(TEMPLATES)): the whole finite training vocabulary,
    for precomputing text-encoder outputs once."""
    return [caption for label in range(10) for caption in caption_templates(label)]


def sample_caption(label: int, generator: torch.Generator) -> str:
    """One caption for `label`, a template drawn uniformly with `generator` (deterministic for a
    seeded generator)."""
    templates = caption_templates(label)
    return templates[int(torch.randint(len(templates), (1,), generator=generator))]


def sample_captions(labels: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One caption per label of `labels` (B,) int64, templates drawn with one call to `generator`."""
    choices = torch.randint(len(TEMPLATES), (len(labels),), generator=generator).tolist()
    return [caption_templates(label)[choice] for label, choice in zip(labels.tolist(), choices)]


def prompt_for_digit(digit: int) -> str:
    """The canonical evaluation prompt for a digit, e.g. "the digit 7"."""
    return CANONICAL_TEMPLATE.format(numeral=_check_digit(digit))


def label_from_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for ("digit 7", "a Seven!", "the number seven" -> 7), or None when it
    names no digit, several different ones, or a number that is not a single digit ("12")."""
    found = set()
    for token in _TOKEN.findall(prompt.lower()):
        if token.isdigit():
            if len(token) != 1:
                return None
            found.add(int(token))
        elif token in _WORD_TO_DIGIT:
            found.add(_WORD_TO_DIGIT[token])
    return found.pop() if len(found) == 1 else None
