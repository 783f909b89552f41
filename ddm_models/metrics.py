"""Offline quality metrics for generated digits, judged by a small CNN trained on the embedded data.

- conditional accuracy: the fraction of samples asked for digit d that the classifier reads as d;
- classifier FID: the Frechet distance between Gaussians fitted to the classifier's penultimate
  features of real and generated images (the Inception FID recipe with our own feature network,
  since Inception weights cannot be downloaded here). Numbers are comparable only between runs that
  use the same classifier (same recipe, hence the same cache file).

The classifier trains once, deterministically (~15 s on one quiet core), and is cached on disk.
Inception FID (`inception_fid`) is there for real data sets, only where torch-fidelity and its
weights are already installed locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddm_models.checkpoint import content_checksum
from ddm_models.data import ImageDataset, heldout_split, load_embedded_digits, load_small_digits, subset
from ddm_models.local_cache import default_cache_dir, exclusive, write_atomically
from ddm_models.errors import ModelError

# The file torch-fidelity downloads for its Inception v3; `inception_fid` looks for it in the cache dir.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

DATASETS = {"mnist-5k": load_embedded_digits, "sklearn-digits-8x8": load_small_digits}


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that determines the trained classifier; its hash names the cache file."""

    dataset: str = "mnist-5k"
    heldout_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    max_rotation_deg: float = 10.0
    max_shift_fraction: float = 0.08  # random translation, as a fraction of the image side
    width: int = 16  # channels of the first conv pair; the second pair has twice as many
    version: int = 1  # bump when DigitClassifier's architecture changes

    def cache_key(self) -> str:
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


DEFAULT_RECIPE = ClassifierRecipe()


class DigitClassifier(nn.Module):
    """A small CNN: two conv pairs with max-pooling, a 128-unit penultimate layer, 10 logits.

    Input (B, C, H, W) in [-1, 1] (values outside are clamped: samples may overshoot), H and W
    divisible by 4. `features` gives the penultimate (B, 128) activations used for FID.
    """

    num_features = 128

    def __init__(self, image_size: int = 28, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * w * (image_size // 4) ** 2, self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, num_classes))
        self.heldout_accuracy = float("nan")  # set by training or loading

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.clamp(-1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _augment(images: torch.Tensor, recipe: ClassifierRecipe, generator: torch.Generator) -> torch.Tensor:
    """Random small rotations and shifts (bilinear, background -1), one draw per image."""
    count = images.shape[0]
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(recipe.max_rotation_deg)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * 2 * recipe.max_shift_fraction
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1


def _new_classifier(dataset: ImageDataset, recipe: ClassifierRecipe) -> DigitClassifier:
    return DigitClassifier(dataset.image_shape[1], dataset.image_shape[0], len(dataset.class_names), recipe.width)


def train_classifier(dataset: ImageDataset, recipe: ClassifierRecipe = DEFAULT_RECIPE) -> DigitClassifier:
    """Train on the recipe's training split of `dataset` (AdamW, one-cycle schedule, augmentation),
    deterministically for the recipe's seeds, and record the held-out accuracy."""
    if not isinstance(dataset, ImageDataset):  # a captioned data set has no classes to learn
        raise ValueError(f"the classifier metrics need a labelled ImageDataset; {dataset.name} has captions only "
                         f"(measure it by held-out loss: ddm_models.evaluation.expert_loss)")
    train_idx, heldout_idx = heldout_split(len(dataset), recipe.heldout_fraction, recipe.split_seed)
    train, heldout = subset(dataset, train_idx), subset(dataset, heldout_idx)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = _new_classifier(dataset, recipe)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(train), generator=generator)
        for batch in order.split(recipe.batch_size):
            loss = F.cross_entropy(model(_augment(train.images[batch], recipe, generator)), train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    model.heldout_accuracy = conditional_accuracy(model, heldout.images, heldout.labels)
    return model


def load_or_train_classifier(cache_dir: str | Path | None = None, recipe: ClassifierRecipe = DEFAULT_RECIPE) -> DigitClassifier:
    """The classifier for `recipe`, from `cache_dir` (default: $DDM_SWARM_CACHE or
    ~/.cache/ddm-swarm) or, when absent or unreadable there, trained now and cached (atomic write;
    concurrent callers wait for the first one). Returned in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    dataset = DATASETS[recipe.dataset]()
    path = Path(default_cache_dir() if cache_dir is None else cache_dir)
    path = path / f"digit-classifier-{recipe.cache_key()}.safetensors"
    with exclusive(path):
        if path.exists():
            try:
                with safe_open(path, "pt") as file:
                    metadata = file.metadata()
                model = _new_classifier(dataset, recipe)
                state = load_file(path)
                if metadata.get("checksum") != content_checksum(metadata, state):  # bytes rot on disk too
                    raise ValueError("its contents do not match the checksum written with them")
                model.load_state_dict(state)
                if metadata.get("data_fingerprint") == dataset.fingerprint():
                    model.heldout_accuracy = float(metadata["heldout_accuracy"])
                    return model.eval()
            except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as error:
                warnings.warn(f"retraining the digit classifier: cache file {path} is unreadable ({error})")
        model = train_classifier(dataset, recipe)
        metadata = {"recipe": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
                    "data_fingerprint": dataset.fingerprint(), "heldout_accuracy": repr(model.heldout_accuracy)}
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        metadata["checksum"] = content_checksum(metadata, state)
        write_atomically(path, lambda temporary: save_file(state, temporary, metadata=metadata))
        return model


def heldout_reference(recipe: ClassifierRecipe = DEFAULT_RECIPE) -> ImageDataset:
    """The recipe's held-out images (1,000 for the default), which the classifier never trained on:
    the real side of `classifier_fid` for generated digits."""
    dataset = DATASETS[recipe.dataset]()
    _, heldout_idx = heldout_split(len(dataset), recipe.heldout_fraction, recipe.split_seed)
    return subset(dataset, heldout_idx, name=f"{dataset.name}-heldout")


@torch.no_grad()
def predict(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) int64 for images (N, C, H, W) in [-1, 1]."""
    classifier.eval()
    return torch.cat([classifier(chunk).argmax(1) for chunk in images.split(batch_size)])


def conditional_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` (N, C, H, W) that the classifier labels as `labels` (N,): for samples
    generated from the prompt for digit d, pass d as their label."""
    return (predict(classifier, images) == labels.to(torch.int64)).double().mean().item()


class _PenultimateFeatures(nn.Module):
    """The classifier's penultimate layer as a torchmetrics feature extractor."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


@torch.no_grad()
def classifier_fid(classifier: DigitClassifier, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 500) -> float:
    """FID between images `real` and `fake` (N, C, H, W) in [-1, 1], in the classifier's 128-d
    penultimate feature space. Uses torchmetrics' FrechetInceptionDistance with our feature network
    (streamed float64 moments, matrix square root via eigenvalues). Needs >= 2 images per side; the
    estimate is biased upwards for small N, so compare runs with equal sample counts."""
    return feature_fid(_PenultimateFeatures(classifier), real, fake, batch_size)


@torch.no_grad()
def feature_fid(features: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 500) -> float:
    """FID between images `real` and `fake` (N, C, H, W) in [-1, 1] in the feature space of
    `features` (a module images -> (B, D) with a `num_features` attribute = D), through torchmetrics'
    FrechetInceptionDistance (streamed float64 moments). Needs >= 2 images per side and is biased
    upwards for small N: compare only runs with equal sample counts and the same feature module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=True)
    for chunk in real.split(batch_size):
        metric.update(chunk.float(), real=True)
    for chunk in fake.split(batch_size):
        metric.update(chunk.float(), real=False)
    return float(metric.compute())


class MetricUnavailable(ModelError, RuntimeError):
    """A metric needs a package or weights that are not installed locally; the message says which."""


@torch.no_grad()
def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path: str | Path | None = None,
                  batch_size: int = 100) -> float:
    """Standard Inception-v3 FID (2048-d pool features) between images (N, C, H, W) in [-1, 1], C
    1 or 3, for real data sets. Needs torch-fidelity and its weights file already on disk
    (`weights_path`, default `<cache dir>/INCEPTION_WEIGHTS_FILE`): nothing is downloaded."""
    path = Path(weights_path) if weights_path is not None else default_cache_dir() / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise MetricUnavailable(f"Inception FID needs the Inception v3 weights at {path}; copy "
                                f"{INCEPTION_WEIGHTS_FILE} there, or use classifier_fid")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise MetricUnavailable("Inception FID needs torch-fidelity (pip install torch-fidelity, with a "
                                "torch build it supports), or use classifier_fid")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            chunk = ((chunk.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            metric.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=is_real)
    return float(metric.compute())


def thumbnail_features(images: torch.Tensor, side: int = 16) -> torch.Tensor:
    """A fixed feature space for colour images: (B, 3 * side^2) area-downsampled pixels in [-1, 1],
    centred and L2-normalised per image (so overall brightness does not decide the neighbour)."""
    small = torch.nn.functional.interpolate(images.float(), size=(side, side), mode="area").flatten(1)
    small = small - small.mean(dim=1, keepdim=True)
    return small / small.norm(dim=1, keepdim=True).clamp_min(1e-6)


def prompt_agreement(generated: torch.Tensor, prompts: list[str], references: torch.Tensor,
                     reference_captions: list[str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """How often the real image nearest to a generated one (`thumbnail_features`, cosine) is one the
    prompt names: "top1" (the nearest), "top5" (one of the 5 nearest), against chance for the same
    reference set ("chance_top1", "chance_top5": the share of references the prompt names, times k).
    generated: (B, C, H, W) in [-1, 1]; references: (N, C, H', W'); captions: the references' own."""
    similarity = thumbnail_features(generated) @ thumbnail_features(references).T  # (B, N)
    order = similarity.argsort(dim=1, descending=True)
    figures: dict[str, float] = {}
    for k in ks:
        hits = [any(reference_captions[j] == prompt for j in order[i, :k].tolist()) for i, prompt in enumerate(prompts)]
        named = [sum(caption == prompt for caption in reference_captions) / len(reference_captions) for prompt in prompts]
        figures[f"top{k}"] = sum(hits) / len(hits)
        figures[f"chance_top{k}"] = min(1.0, k * sum(named) / len(named))
    return figures


class ThumbnailPCAFeatures(nn.Module):
    """A fixed, offline feature space for colour images (not Inception): the `swarm create` offline
    embedding's thumbnails (`image_embeddings.ThumbnailEmbedder`, 8x8 area averages of RGB) projected
    onto the top `dim` principal components of a reference set's thumbnails, fitted once here.
    images (B, 3, H, W) in [-1, 1] (clamped) -> (B, dim) float32."""

    def __init__(self, reference: torch.Tensor, dim: int | None = None):
        from ddm_models.image_embeddings import THUMBNAIL_PCA_DIM, ThumbnailEmbedder

        super().__init__()
        self.embed = ThumbnailEmbedder()
        rows = self.embed(reference.clamp(-1, 1)).double()
        dim = min(dim or THUMBNAIL_PCA_DIM, rows.shape[1], rows.shape[0])
        mean = rows.mean(0)
        _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)  # exact, deterministic
        self.register_buffer("mean", mean.float())
        self.register_buffer("components", vh[:dim].T.float().contiguous())  # (D_thumb, dim)
        self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.embed(images.clamp(-1, 1)) - self.mean) @ self.components
