"""What a training image is conditioned on: its own caption, or one drawn from its digit label.

Trainers and evaluation take either kind of data set:
- `ImageDataset` (the digit swarms): captions come from the labels through a caption sampler
  (`captions.sample_captions` draws one template per image from the step's generator);
- `CaptionedDataset` (a swarm's own captioned images): every image has its own caption, which
  is used as it is, and the generator is not drawn from.

Caption dropout (classifier-free guidance) is not here: the trainer draws it per sample and the
expert swaps the dropped prompts for its learned null embedding (`Expert._condition_text`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch

from ddm_models.captioned_data import CaptionedDataset
from ddm_models.data import ImageDataset
from ddm_models.text import CachedTextEncoder, TextEncoder

TrainingData = Union[ImageDataset, CaptionedDataset]
CaptionSampler = Callable[[torch.Tensor, torch.Generator], list[str]]


def batch_captions(data: TrainingData, index: torch.Tensor, generator: torch.Generator,
                   caption_sampler: CaptionSampler) -> list[str]:
    """One caption per image at `index` (B,) int64: a captioned image's own, or for a labelled
    image `caption_sampler(labels, generator)`."""
    if isinstance(data, CaptionedDataset):
        return data.captions_at(index)
    return caption_sampler(data.labels[index], generator)


def caption_encoder(text_encoder: TextEncoder, *datasets: TrainingData | None) -> TextEncoder:
    """The encoder a trainer should use for `datasets`' captions.

    For captioned data sets and a `CachedTextEncoder`: when all their distinct captions fit in the
    cache's bound, they are encoded now, once, and every later batch is a table lookup; when they
    do not fit, the cache's own encoder is returned, since random batches over more captions than
    the table holds would only refill it over and over. Labelled data sets (whose captions the
    caller precomputes, e.g. `captions.all_captions()`) and other encoders are left as they are."""
    captioned = [d for d in datasets if isinstance(d, CaptionedDataset)]
    if not captioned or not isinstance(text_encoder, CachedTextEncoder):
        return text_encoder
    distinct = list(dict.fromkeys(c for data in captioned for c in data.distinct_captions()))
    if len(distinct) > text_encoder.max_entries:
        return text_encoder.encoder
    text_encoder.precompute(distinct)  # may start the table afresh: what it held is re-encoded when asked
    return text_encoder


def cluster_labels(data: TrainingData, clusters: torch.Tensor | None) -> torch.Tensor:
    """`clusters` (N,), or when None the data set's own (a `CaptionedDataset` read with clusters)."""
    if clusters is not None:
        return torch.as_tensor(clusters)
    own = getattr(data, "clusters", None)
    if own is None:
        raise ValueError(f"the router's data set {data.name} has no cluster ids; pass clusters (N,) int64")
    return own
