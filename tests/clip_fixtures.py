"""A tiny CLIP text encoder written into a Hugging Face cache layout, so the "clip:" encoder is
tested offline through the very path the real openai/clip-vit-large-patch14 takes: a model id
resolved in a hub cache (`models--<org>--<name>/snapshots/<commit>/`, `refs/main`)."""

import json
from pathlib import Path

import torch

TINY_CLIP_ID = "tiny-org/tiny-clip"
TINY_CLIP_WIDTH = 32
TINY_CLIP_POSITIONS = 32
_COMMIT = "0123456789abcdef0123456789abcdef01234567"
# A few merges so that common words of the tests are single tokens, as in the real vocabulary.
_MERGES = [("r", "e"), ("re", "d</w>"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]


def _write_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt in the format openai's CLIP repositories ship: byte-level BPE,
    every byte symbol alone and word-final (`</w>`), the start/end tokens, and a few merges."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab[symbol] = len(vocab)
    merges = list(_MERGES)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def write_tiny_clip_cache(cache_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer, 32-wide CLIPTextModel and its tokenizer, saved with
    `save_pretrained` as the hub cache entry of `TINY_CLIP_ID` under `cache_dir`; returns the
    snapshot folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    repo = Path(cache_dir) / ("models--" + TINY_CLIP_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / _COMMIT
    words = Path(cache_dir) / "tokenizer-source"
    for folder in (snapshot, words, repo / "refs"):
        folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_files(words)
    tokenizer = CLIPTokenizer.from_pretrained(words)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TINY_CLIP_WIDTH, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TINY_CLIP_POSITIONS,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPTextModel(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs" / "main").write_text(_COMMIT)
    return snapshot
