"""The router: p(cluster | x_t, t[, text]) for the ensemble sampler.

Two backbones (`RouterConfig.backbone`). "conv", a small conv net: stages of (3x3 conv, GroupNorm, FiLM from the time embedding, SiLU), each after
the first halving the resolution, then global average pooling and an MLP to K logits. With
`use_text`, a projection of the pooled text embedding joins the time embedding (DDM's router may
see the condition; Paris's sees only x_t and t); near t = 1 the image carries no information, so
only the text can say which cluster the sample will end in. "dit", DDM's router: a DiT trunk
(patch embedding, AdaLN-Single blocks with self-attention only) over a learned CLS token and the
patches, the CLS token's output decoded to K logits.

It must be trained on exactly the sampler's noising path: FM time t in [0, 1], x_t = (1-t) x0 + t
eps (`training_example`), the same t the sampler passes.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn

from ddm_models.configs import RouterConfig
from ddm_models.objectives import FM_TIMESTEP_SCALE, fm_noised
from ddm_models.text import TextBatch


class _Stage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, downsample: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2 if downsample else 1, padding=1)
        self.norm = nn.GroupNorm(min(8, out_channels), out_channels)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        return self.act(self.norm(self.conv(x)) * (1 + scale) + shift)


class Router(nn.Module):
    """forward(x_t, t, text=None) -> logits (B, K).

    x_t: (B, C, H, W) FM state; t: (B,) FM time in [0, 1]; text: a `TextBatch` (its `pooled` is
    used) when `config.use_text`, else ignored.
    """

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        dim = config.time_dim
        self.time_proj = Timesteps(num_channels=dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(in_channels=dim, time_embed_dim=dim)
        self.text_embed = (nn.Sequential(nn.Linear(config.text_pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
                           if config.use_text else None)
        widths = (config.in_channels, *config.channels)
        self.stages = nn.ModuleList([_Stage(widths[i], widths[i + 1], dim, downsample=i > 0)
                                     for i in range(len(config.channels))])
        self.head = nn.Sequential(nn.Linear(config.channels[-1] + dim, dim), nn.SiLU(),
                                  nn.Linear(dim, config.num_clusters))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: TextBatch | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        cond = self.time_embed(self.time_proj(t * FM_TIMESTEP_SCALE).to(x_t.dtype))
        if self.text_embed is not None:
            if text is None:
                raise ValueError("this router was configured with use_text=True and needs the prompts' TextBatch")
            cond = cond + self.text_embed(text.pooled.to(x_t.dtype))
        hidden = x_t
        for stage in self.stages:
            hidden = stage(hidden, cond)
        return self.head(torch.cat([hidden.mean(dim=(2, 3)), cond], dim=1))

    @staticmethod
    def training_example(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The router's input for clean images x0 at FM time t: exactly the sampler's path."""
        return fm_noised(x0, noise, t)


class DiTRouter(nn.Module):
    """forward(x_t, t, text=None) -> logits (B, K), with the same inputs as `Router`."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.pos_embed = PatchEmbed(height=config.sample_size, width=config.sample_size, patch_size=config.patch_size,
                                    in_channels=config.in_channels, embed_dim=width, interpolation_scale=1)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.adaln_single = AdaLayerNormSingle(width)
        self.text_embed = (PixArtAlphaTextProjection(in_features=config.text_pooled_dim, hidden_size=width)
                           if config.use_text else None)
        self.blocks = nn.ModuleList([
            BasicTransformerBlock(width, config.heads, width // config.heads, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=1000, attention_bias=True, norm_type="ada_norm_single",
                                  norm_elementwise_affine=False, norm_eps=1e-6,
                                  ff_inner_dim=int(width * config.mlp_ratio))
            for _ in range(config.depth)])
        self.norm_out = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, config.num_clusters)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: TextBatch | None = None) -> torch.Tensor:
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(batch)
        hidden = self.pos_embed(x_t)  # (B, T, D)
        hidden = torch.cat([self.cls_token.to(hidden.dtype).expand(batch, -1, -1), hidden], dim=1)  # (B, 1+T, D)
        conditioning = self.adaln_single.emb(t * FM_TIMESTEP_SCALE, None, None, batch_size=batch,
                                             hidden_dtype=hidden.dtype)  # (B, D)
        if self.text_embed is not None:
            if text is None:
                raise ValueError("this router was configured with use_text=True and needs the prompts' TextBatch")
            conditioning = conditioning + self.text_embed(text.pooled.to(hidden.dtype))
        modulation = self.adaln_single.linear(self.adaln_single.silu(conditioning))  # (B, 6 D)
        for block in self.blocks:
            hidden = block(hidden, timestep=modulation)
        return self.head(self.norm_out(hidden[:, 0]))  # (B, K)

    training_example = staticmethod(Router.training_example)


def build_router(config: RouterConfig) -> Router | DiTRouter:
    """A freshly initialised router of `config.backbone`."""
    return DiTRouter(config) if config.backbone == "dit" else Router(config)
