"""Captions derived from digit labels, and prompts parsed back to labels."""

import pytest
import torch

from ddm_models.captions import (
    all_captions,
    caption_templates,
    label_from_prompt,
    prompt_for_digit,
    sample_caption,
    sample_captions,
)


def test_every_digit_has_varied_captions_with_words_and_numerals():
    captions = caption_templates(7)
    assert len(set(captions)) >= 8
    assert any("seven" in c for c in captions) and any("7" in c for c in captions)


def test_canonical_prompt_is_one_of_the_training_captions():
    for digit in range(10):
        assert prompt_for_digit(digit) == f"the digit {digit}"
        assert prompt_for_digit(digit) in caption_templates(digit)


def test_every_caption_parses_back_to_its_digit():
    for digit in range(10):
        for caption in caption_templates(digit):
            assert label_from_prompt(caption) == digit, caption


def test_label_from_prompt_reads_free_phrasing():
    assert label_from_prompt("digit 7") == 7
    assert label_from_prompt("A SEVEN!") == 7
    assert label_from_prompt("draw me a zero, please") == 0


@pytest.mark.parametrize("prompt", ["", "a cat", "the number 12", "a three and a four", "digit 3 or 5"])
def test_label_from_prompt_is_none_without_exactly_one_digit(prompt):
    assert label_from_prompt(prompt) is None


def test_label_from_prompt_accepts_a_digit_named_twice():
    assert label_from_prompt("seven, the digit 7") == 7


def test_sampled_captions_are_deterministic_for_a_seed_and_cover_the_templates():
    labels = torch.tensor([3] * 200)
    first = sample_captions(labels, torch.Generator().manual_seed(1))
    assert first == sample_captions(labels, torch.Generator().manual_seed(1))
    assert set(first) == set(caption_templates(3))
    assert sample_caption(3, torch.Generator().manual_seed(5)) in caption_templates(3)


def test_all_captions_lists_every_template_of_every_digit():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 10 * len(caption_templates(0))


def test_a_label_outside_0_to_9_is_refused():
    with pytest.raises(ValueError):
        caption_templates(10)
