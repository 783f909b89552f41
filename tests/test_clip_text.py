"""The CLIP text encoder through `transformers`, tested offline on a tiny CLIP in a hub cache."""

import pytest
import torch

from ddm_models.text import (CLIP_MAX_TOKENS, CachedTextEncoder, CLIPTextEncoder, TextEncoderError,
                             TextEncoderUnavailable, UnknownTextEncoder, build_text_encoder, default_max_tokens,
                             text_encoder_dims, text_encoder_spec)
from tests.clip_fixtures import TINY_CLIP_ID, TINY_CLIP_POSITIONS, TINY_CLIP_WIDTH, write_tiny_clip_cache

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    return cache, write_tiny_clip_cache(cache)


@pytest.fixture(scope="module")
def clip(hub):
    return build_text_encoder(f"clip:{TINY_CLIP_ID}", cache_dir=hub[0], max_length=16, cached=False)


def test_clip_names_resolve_to_model_ids_without_loading_anything():
    assert text_encoder_spec("clip-vit-large-patch14") == ("clip", "openai/clip-vit-large-patch14", "")
    assert text_encoder_spec("clip:someone/their-clip") == ("clip", "someone/their-clip", "")
    assert default_max_tokens("clip-vit-large-patch14") == CLIP_MAX_TOKENS == 77
    with pytest.raises(UnknownTextEncoder, match="clip:<Hugging Face model id>"):
        text_encoder_spec("clip:")


def test_clip_encoder_from_a_hub_cache_gives_token_states_mask_and_pooled_end_token(clip):
    batch = clip.encode(["a red square", "blue"])
    assert clip.name == f"clip:{TINY_CLIP_ID}" and clip.dim == clip.pooled_dim == TINY_CLIP_WIDTH
    assert batch.states.shape == (2, 16, TINY_CLIP_WIDTH) and batch.pooled.shape == (2, TINY_CLIP_WIDTH)
    # "blue" is one merged token: start, blue, end
    assert batch.mask.dtype == torch.bool and batch.mask[1].sum() == 3
    assert torch.all(batch.states[~batch.mask] == 0)
    ends = batch.mask.sum(1) - 1  # CLIP pools the state at the end token, the last real one
    assert torch.equal(batch.pooled, batch.states[torch.arange(2), ends])


def test_clip_states_are_the_transformers_models_own(hub, clip):
    from transformers import CLIPTextModel

    reference = CLIPTextModel.from_pretrained(hub[1]).eval()
    tokens = clip.tokenizer(["a blue circle"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**tokens).last_hidden_state
    real = tokens["attention_mask"][0].bool()
    assert torch.allclose(clip.encode(["a blue circle"]).states[0, real], expected[0, real], atol=1e-6)


def test_clip_prompts_longer_than_max_length_are_truncated(clip):
    assert clip.encode([" ".join(["red"] * 40)]).mask.sum() == 16


def test_clip_encoder_also_loads_from_a_local_folder(hub):
    encoder = CLIPTextEncoder(str(hub[1]), max_length=8)
    assert encoder.encode(["red"]).states.shape == (1, 8, TINY_CLIP_WIDTH)


def test_cached_clip_encoder_holds_as_many_prompts_as_its_byte_bound_allows(hub):
    encoder = build_text_encoder(f"clip:{TINY_CLIP_ID}", cache_dir=hub[0], max_length=16)
    assert isinstance(encoder, CachedTextEncoder)
    bounded = CachedTextEncoder(encoder.encoder, max_bytes=3 * encoder.entry_bytes)
    assert bounded.max_entries == 3


def test_missing_clip_model_is_refused_naming_the_model_id(hub):
    with pytest.raises(TextEncoderUnavailable, match="clip:openai/clip-vit-large-patch14"):
        build_text_encoder("clip-vit-large-patch14", cache_dir=hub[0])


def test_clip_token_length_beyond_its_positions_is_refused(hub):
    with pytest.raises(TextEncoderError, match=f"at most {TINY_CLIP_POSITIONS} tokens"):
        build_text_encoder(f"clip:{TINY_CLIP_ID}", cache_dir=hub[0], max_length=TINY_CLIP_POSITIONS + 1)


def test_encoder_dims_are_known_from_the_name_and_the_cached_config(hub):
    assert text_encoder_dims("minilm") == (384, 384)
    assert text_encoder_dims(f"clip:{TINY_CLIP_ID}", cache_dir=hub[0]) == (TINY_CLIP_WIDTH, TINY_CLIP_WIDTH)
    with pytest.raises(TextEncoderUnavailable, match="clip:openai/clip-vit-large-patch14"):
        text_encoder_dims("clip-vit-large-patch14", cache_dir=hub[0])
