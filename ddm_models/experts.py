"""The expert: a DiT-style transformer with AdaLN-Single (PixArt-alpha) and text cross-attention.

Built from diffusers' parts, assembled here so that tiny pixel-space experts can add a conv stem
and conv head and a pooled-text term in the AdaLN-Single conditioning:

    x (B,C,H,W) -> [conv stem] ----------------------------------------------+ (optional skip)
                -> PatchEmbed (+ fixed sin-cos positions) -> N x BasicTransformerBlock
      (norm_type="ada_norm_single": modulation from one shared MLP of the timestep embedding,
       self-attention, cross-attention on projected text token states, MLP)
    -> final modulated LayerNorm -> linear -> unpatchify -> [concat skip, conv head] -> prediction

    conditioning c = timestep embedding (+ projection of the pooled text embedding)

Caption dropout replaces a prompt by a learned null embedding (a single null token, and a null
pooled vector), which is also the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn

from ddm_models.configs import ExpertConfig
from ddm_models.text import TextBatch


class Expert(nn.Module):
    """One expert. `forward(x_in, timestep, text, drop_text=None) -> prediction`.

    x_in: (B, C, H, W) in the objective's input space; timestep: (B,) float in the objective's
    model units (0..999); text: a `TextBatch` with states (B, L, text_dim), mask (B, L), pooled
    (B, text_pooled_dim); drop_text: optional (B,) bool, True where the prompt is replaced by the
    null embedding. Returns (B, C, H, W): velocity for "fm" experts, epsilon for "ddpm" ones.
    """

    def __init__(self, config: ExpertConfig):
        super().__init__()
        self.config = config
        width, patch = config.width, config.patch_size
        self.stem = None
        patch_in = config.in_channels
        if config.stem_channels:
            self.stem = nn.Sequential(nn.Conv2d(config.in_channels, config.stem_channels, 3, padding=1), nn.SiLU())
            patch_in = config.stem_channels
        self.pos_embed = PatchEmbed(height=config.sample_size, width=config.sample_size, patch_size=patch,
                                    in_channels=patch_in, embed_dim=width, interpolation_scale=1)
        self.adaln_single = AdaLayerNormSingle(width)
        self.caption_projection = PixArtAlphaTextProjection(in_features=config.text_dim, hidden_size=width)
        self.pooled_projection = (PixArtAlphaTextProjection(in_features=config.text_pooled_dim, hidden_size=width)
                                  if config.pooled_text else None)
        # Learned null prompt: one token in the text encoder's space (padded with masked zeros) and
        # one pooled vector, like PixArt's y_embedding.
        self.null_token = nn.Parameter(torch.randn(config.text_dim) * config.text_dim ** -0.5)
        self.null_pooled = nn.Parameter(torch.randn(config.text_pooled_dim) * config.text_pooled_dim ** -0.5)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(width, config.heads, width // config.heads, cross_attention_dim=width,
                                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                  attention_bias=True, norm_type="ada_norm_single",
                                  norm_elementwise_affine=False, norm_eps=1e-6,
                                  ff_inner_dim=int(width * config.mlp_ratio))
            for _ in range(config.depth)])
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, width) / width ** 0.5)
        self.out_channels = config.head_channels or config.in_channels
        self.proj_out = nn.Linear(width, patch * patch * self.out_channels)
        self.skip = bool(config.stem_skip and config.stem_channels and config.head_channels)
        head_in = config.head_channels + (config.stem_channels if self.skip else 0)
        self.head = (nn.Sequential(nn.SiLU(), nn.Conv2d(head_in, config.in_channels, 3, padding=1))
                     if config.head_channels else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT/PixArt initialisation: Xavier linears, small-normal timestep MLP, zero output layer and
        zero cross-attention output, so a fresh expert predicts 0 and each block starts near identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        projection = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))
        embedder = self.adaln_single.emb.timestep_embedder
        nn.init.normal_(embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.linear_2.weight, std=0.02)
        nn.init.normal_(self.adaln_single.linear.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        self.reset_output_layer()

    def reset_output_layer(self) -> None:
        """Zero the last layer (the conv head if any, else the patch projection). DDPM -> FM conversion
        calls this to forget the old objective's output while keeping the trunk."""
        last = self.head[-1] if self.head is not None else self.proj_out
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        if self.head is not None:
            nn.init.xavier_uniform_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, text: TextBatch,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = x_in.shape
        if text.states.shape[0] != batch:
            raise ValueError(f"text batch has {text.states.shape[0]} prompts for {batch} images")
        states, mask, pooled = self._condition_text(text, drop_text)
        features = self.stem(x_in) if self.stem is not None else x_in
        hidden = self.pos_embed(features)

        timestep = timestep.to(x_in.device).float().expand(batch) if timestep.ndim == 0 else timestep.float()
        conditioning = self.adaln_single.emb(timestep, None, None, batch_size=batch, hidden_dtype=hidden.dtype)
        if self.pooled_projection is not None:
            conditioning = conditioning + self.pooled_projection(pooled.to(hidden.dtype))
        modulation = self.adaln_single.linear(self.adaln_single.silu(conditioning))

        context = self.caption_projection(states.to(hidden.dtype))
        # Additive bias over the text tokens, (B, 1, L): 0 to attend, -10000 to ignore (PixArt's form).
        context_bias = (1.0 - mask.to(hidden.dtype)).mul(-10000.0).unsqueeze(1)
        for block in self.transformer_blocks:
            hidden = block(hidden, encoder_hidden_states=context, encoder_attention_mask=context_bias,
                           timestep=modulation)

        shift, scale = (self.scale_shift_table[None] + conditioning[:, None]).chunk(2, dim=1)
        hidden = self.proj_out(self.norm_out(hidden) * (1 + scale) + shift)
        image = self._unpatchify(hidden, height, width)
        if self.head is None:
            return image
        return self.head(torch.cat([image, features], dim=1) if self.skip else image)

    def _condition_text(self, text: TextBatch, drop_text: torch.Tensor | None):
        states, mask, pooled = text.states, text.mask, text.pooled
        if states.shape[-1] != self.config.text_dim or pooled.shape[-1] != self.config.text_pooled_dim:
            raise ValueError(f"text states/pooled have {states.shape[-1]}/{pooled.shape[-1]} channels, the expert "
                             f"expects {self.config.text_dim}/{self.config.text_pooled_dim}: wrong text encoder")
        if drop_text is None:
            return states, mask, pooled
        # no `if drop_text.any()`: reading it back would stall a GPU every step and break torch.compile's graph
        drop = drop_text.to(states.device).bool()
        null_states = torch.zeros_like(states[:1])
        null_states[:, 0] = self.null_token
        null_mask = torch.zeros_like(mask[:1])
        null_mask[:, 0] = True
        states = torch.where(drop[:, None, None], null_states.to(states.dtype), states)
        mask = torch.where(drop[:, None], null_mask, mask)
        pooled = torch.where(drop[:, None], self.null_pooled.to(pooled.dtype)[None], pooled)
        return states, mask, pooled

    def _unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        patch, channels = self.config.patch_size, self.out_channels
        grid_h, grid_w = height // patch, width // patch
        tokens = tokens.reshape(-1, grid_h, grid_w, patch, patch, channels)
        return torch.einsum("nhwpqc->nchpwq", tokens).reshape(-1, channels, grid_h * patch, grid_w * patch)


def build_expert(config: ExpertConfig) -> Expert:
    """A freshly initialised expert for `config` (seed torch beforehand for a reproducible init)."""
    return Expert(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
