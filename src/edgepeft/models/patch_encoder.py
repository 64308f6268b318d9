"""PatchEncoder: the frozen base model. A masked-patch transformer for multichannel sensor windows.

Design, and why:
- Channel-independent patches (PatchTST-style): every channel is cut into patches of ``patch_len``
  samples and encoded by the same temporal transformer, so one base serves 1 to 64+ channels and any
  sampling rate (it only ever sees samples, and was pretrained on time scales from a few to hundreds
  of samples).
- Instance normalisation per window and channel, computed over *visible* samples only (so a hidden
  patch never leaks into its own prediction). Per-window normalisation alone hides level shifts and
  variance changes, which often *are* the anomaly, so the removed mean and log-std enter the
  sequence as a "stats token" and the output is de-normalised again: the model predicts in the
  asset's own units and a level that does not fit the other channels is an error.
- Cross-channel blocks attend across channels at each patch position. Which channel is which is a
  per-asset fact, so channels carry small identity tags (``channel_tags``, ``d_channel`` numbers per
  channel). Pretraining feeds random tags; an asset's adapter learns its own (they are part of every
  delta, a few hundred numbers).
- Objective: reconstruct hidden patches. Hiding the last patch of every channel is forecasting, which
  makes scoring causal: the error at row t compares row t with a prediction made from rows before its
  patch.

Shapes: B batch, L window_len, C channels, N = L // patch_len patches, P patch_len, D d_model.

Example:
    >>> import torch
    >>> model = PatchEncoder(PatchEncoderConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64))
    >>> x = torch.randn(4, 64, 3)                     # (B, L, C)
    >>> hidden = model.forecast_mask(4, 3)            # hide the last patch of every channel
    >>> model(x, hidden).shape
    torch.Size([4, 64, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from edgepeft.core.errors import ConfigError, ModelError


@dataclass
class PatchEncoderConfig:
    """Size and shape of a PatchEncoder.

    Attributes:
        window_len: samples per window the model sees (L); a multiple of ``patch_len``.
        patch_len: samples per patch (P); the forecast horizon when scoring.
        d_model: token width (D).
        n_heads: attention heads; must divide ``d_model``.
        n_layers: temporal (channel-independent) transformer blocks.
        n_channel_layers: cross-channel blocks after the temporal ones.
        d_ff: hidden width of each block's MLP.
        d_channel: width of the per-asset channel identity tags.
        dropout: dropout inside blocks (0 for the small models we ship).
    """

    window_len: int = 64
    patch_len: int = 8
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    n_channel_layers: int = 1
    d_ff: int = 128
    d_channel: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.patch_len < 1 or self.window_len % self.patch_len:
            raise ConfigError(f"window_len {self.window_len} must be a multiple of patch_len {self.patch_len}")
        if self.window_len // self.patch_len < 2:
            raise ConfigError("window_len must hold at least two patches (context and target)")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads {self.n_heads} must divide d_model {self.d_model}")
        if self.n_layers < 1 or self.n_channel_layers < 0:
            raise ConfigError("need at least one temporal layer and zero or more channel layers")

    @property
    def n_patches(self) -> int:
        return self.window_len // self.patch_len


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (LoRA targets them by name).

    ``prefix_k`` / ``prefix_v`` are optional learned key/value prefixes (prefix tuning); the base has
    none and the prefix method registers them.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.register_parameter("prefix_k", None)
        self.register_parameter("prefix_v", None)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention over ``x`` (B', T, D); or ``x`` attending to ``context`` (B', S, D) where ``allowed``
        (T, S) bool says which context token each query may see (prefix slots are always visible)."""
        batch, tokens, width = x.shape  # (B', T, D)
        head_dim = width // self.n_heads
        q = self.q(x).view(batch, tokens, self.n_heads, head_dim).transpose(1, 2)  # (B', H, T, hd)
        source = x if context is None else context
        k = self.k(source)
        v = self.v(source)
        if self.prefix_k is not None and self.prefix_v is not None:
            n_prefix = self.prefix_k.shape[0]
            k = torch.cat([self.prefix_k.unsqueeze(0).expand(batch, n_prefix, width), k], dim=1)
            v = torch.cat([self.prefix_v.unsqueeze(0).expand(batch, n_prefix, width), v], dim=1)
        k = k.view(batch, -1, self.n_heads, head_dim).transpose(1, 2)  # (B', H, T+prefix, hd)
        v = v.view(batch, -1, self.n_heads, head_dim).transpose(1, 2)
        if allowed is not None and self.prefix_k is not None:
            allowed = torch.cat([allowed.new_ones(allowed.shape[0], self.prefix_k.shape[0]), allowed], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: PatchEncoderConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` (B', T, D) through the block; with ``context``, its attention reads those tokens instead (see
        :meth:`Attention.forward`), which is how one pass makes every channel's blind prediction."""
        normed = self.ln1(x)
        x = x + self.attn(normed, None if context is None else self.ln1(context), allowed)
        return x + self.mlp(self.ln2(x))


class PatchEncoder(nn.Module):
    """Masked-patch transformer over (B, L, C) windows; see the module docstring for the design."""

    # The smallest scale the instance normaliser divides by, in asset-standardised units: a stuck or
    # flat channel must not blow its noise up to unit variance.
    MIN_STD = 1e-2

    def __init__(self, cfg: PatchEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.window_len = cfg.window_len
        self.patch_len = cfg.patch_len
        self.patch_embed = nn.Linear(cfg.patch_len, cfg.d_model)
        self.stat_embed = nn.Linear(2, cfg.d_model)
        self.mask_token = nn.Parameter(torch.zeros(cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.n_patches + 1, cfg.d_model))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.channel_proj = nn.Linear(cfg.d_channel, cfg.d_model)
        self.channel_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_channel_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.patch_len)
        # Training-time memory switch (not part of the weights): recompute blocks in backward.
        self.checkpoint_blocks = False
        # Per-asset channel identity tags; empty in the base, sized by set_n_channels for an asset.
        self.channel_tags = nn.Parameter(torch.zeros(0, cfg.d_channel), requires_grad=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise weights (used for pretraining and for the train-from-scratch baseline)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_n_channels(self, n_channels: int, seed: int = 0) -> None:
        """Give the model ``n_channels`` identity tags, drawn like pretraining's random tags."""
        gen = torch.Generator().manual_seed(seed)
        tags = torch.randn(n_channels, self.cfg.d_channel, generator=gen)
        self.channel_tags = nn.Parameter(tags, requires_grad=self.channel_tags.requires_grad)

    def forecast_mask(self, batch: int, n_channels: int) -> torch.Tensor:
        """(B, C, N) bool: hide the last patch of every channel, i.e. forecast it."""
        hidden = torch.zeros(batch, n_channels, self.cfg.n_patches, dtype=torch.bool)
        hidden[:, :, -1] = True
        return hidden

    def forward(
        self,
        x: torch.Tensor,
        hidden: torch.Tensor | None = None,
        channel_tags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reconstruct ``x`` (B, L, C) from its visible patches.

        Args:
            x: windows in asset-standardised units, (B, L, C).
            hidden: (B, C, N) bool, True where a patch is hidden from the model; None hides nothing.
            channel_tags: (C, d_channel) or (B, C, d_channel); None uses the asset's own tags
                (or zeros for a bare base).

        Returns:
            (B, L, C) reconstruction; only hidden patches are meaningful predictions.
        """
        seq, mean, std = self.temporal_features(x, hidden)
        return self.mix(seq, mean, std, channel_tags)

    def temporal_features(
        self, x: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The channel-independent half: (B, C, N+1, D) tokens after the temporal blocks, plus the
        per-window mean and std (B, C) that the output is de-normalised with."""
        cfg = self.cfg
        batch, length, n_channels = x.shape
        if length != cfg.window_len:
            raise ModelError(f"window has {length} samples; this base expects {cfg.window_len}")
        n_patches, patch_len = cfg.n_patches, cfg.patch_len
        if hidden is None:
            hidden = torch.zeros(batch, n_channels, n_patches, dtype=torch.bool, device=x.device)
        patches = x.transpose(1, 2).reshape(batch, n_channels, n_patches, patch_len)  # (B, C, N, P)

        # Instance statistics over visible samples only; fully hidden channels fall back to the
        # asset scale (mean 0, std 1) because the data arrives asset-standardised.
        visible = (~hidden).unsqueeze(-1).to(x.dtype)  # (B, C, N, 1)
        count = visible.sum(dim=(2, 3)) * patch_len  # (B, C)
        safe = count.clamp(min=1.0)
        mean = (patches * visible).sum(dim=(2, 3)) / safe  # (B, C)
        var = (((patches - mean[..., None, None]) ** 2) * visible).sum(dim=(2, 3)) / safe
        has_data = count > 0
        mean = torch.where(has_data, mean, torch.zeros_like(mean))
        std = torch.where(has_data, var.sqrt().clamp(min=self.MIN_STD), torch.ones_like(var))
        normed = (patches - mean[..., None, None]) / std[..., None, None] * visible  # (B, C, N, P)

        tokens = self.patch_embed(normed)  # (B, C, N, D)
        tokens = torch.where(hidden.unsqueeze(-1), self.mask_token.expand_as(tokens), tokens)
        stats = torch.stack([mean, std.log()], dim=-1)  # (B, C, 2)
        stat_token = self.stat_embed(stats).unsqueeze(2)  # (B, C, 1, D)
        seq = torch.cat([stat_token, tokens], dim=2) + self.pos_embed  # (B, C, N+1, D)

        width = cfg.d_model
        seq = seq.reshape(batch * n_channels, n_patches + 1, width)  # channel-independent
        # Blocks before the first one with a trainable parameter need no backward pass: running them
        # without autograd stores none of their activations (TinyTL's point: on small models,
        # activations, not parameters, dominate training memory).
        first_trainable = self._first_trainable_block() if torch.is_grad_enabled() else 0
        for index, block in enumerate(self.blocks):
            if index < first_trainable:
                with torch.no_grad():
                    seq = block(seq)
            else:
                seq = self._run_block(block, seq)
        return seq.reshape(batch, n_channels, n_patches + 1, width), mean, std

    def mix(
        self, seq: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channel_tags: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The cross-channel half: channel blocks, head and de-normalisation; returns (B, L, C)."""
        batch, n_channels, _, _ = seq.shape
        seq = self.mix_tokens(seq, channel_tags)
        out = self.head(self.ln_f(seq[:, :, 1:]))  # (B, C, N, P), normalised units
        out = out * std[..., None, None] + mean[..., None, None]
        return out.reshape(batch, n_channels, -1).transpose(1, 2)  # (B, L, C)

    def mix_tokens(self, seq: torch.Tensor, channel_tags: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, N+1, D) tokens after the cross-channel blocks: what the head reads, and what the detector's
        state head summarises (each channel's token in the context of the others)."""
        batch, n_channels, n_tokens, width = seq.shape
        if self.channel_blocks:
            tags = self._channel_tags(channel_tags, n_channels, seq)
            mixed = seq.transpose(1, 2)  # (B, N+1, C, D)
            mixed = mixed + self.channel_proj(tags).unsqueeze(1)  # tags broadcast over positions
            mixed = mixed.reshape(batch * n_tokens, n_channels, width)
            for block in self.channel_blocks:
                mixed = self._run_block(block, mixed)
            seq = mixed.reshape(batch, n_tokens, n_channels, width).transpose(1, 2)
        return seq

    def blind_mix(
        self, seq: torch.Tensor, blank: torch.Tensor | None = None, channel_tags: torch.Tensor | None = None,
        copies: bool = False,
    ) -> torch.Tensor:
        """Every channel's prediction with that channel hidden entirely (a virtual sensor from the others), in
        one pass: (B, L, C) in asset-standardised units, from the temporal features ``seq`` (B, C, N+1, D).

        Hiding channel c only replaces its temporal features with ``blank`` (the data-free features of a fully
        hidden channel, :meth:`hidden_channel_features`) and its statistics with the asset scale (mean 0, std 1).
        With one cross-channel block, channel c's output then depends on its own blank query and on the other
        channels' real tokens, so a query set of C blank tokens attending to {the others' real tokens, its own
        blank} gives exactly what C copies of the model with one channel hidden each would: cost linear in C
        instead of quadratic. Deeper channel stacks fall back to the C copies (same numbers, more work);
        ``copies=True`` forces them (the reference the tests and the channel benchmark compare with).
        """
        batch, n_channels, n_tokens, width = seq.shape
        blank = self.hidden_channel_features() if blank is None else blank  # (N+1, D)
        if copies or len(self.channel_blocks) != 1:
            rows = torch.arange(batch * n_channels)
            reps = seq.repeat_interleave(n_channels, dim=0).clone()  # copy c hides channel c
            reps[rows, rows % n_channels] = blank
            mean = torch.zeros(batch * n_channels, n_channels, dtype=seq.dtype)
            std = torch.ones_like(mean)
            tags = None if channel_tags is None else channel_tags.repeat_interleave(n_channels, dim=0) \
                if channel_tags.dim() == 3 else channel_tags
            out = self.mix(reps, mean, std, tags).reshape(batch, n_channels, -1, n_channels)  # (B, C, L, C)
            return torch.diagonal(out, dim1=1, dim2=3)  # (B, L, C)
        tags = self.channel_proj(self._channel_tags(channel_tags, n_channels, seq))  # (B, C, D)
        real = (seq + tags.unsqueeze(2)).transpose(1, 2).reshape(batch * n_tokens, n_channels, width)
        hidden = (blank + tags.unsqueeze(2)).transpose(1, 2).reshape(batch * n_tokens, n_channels, width)
        index = torch.arange(n_channels, device=seq.device)  # not torch.eye: this exports with a dynamic C
        eye = index[:, None] == index[None, :]
        allowed = torch.cat([~eye, eye], dim=1)  # (C, 2C): the others' real tokens and one's own blank
        out = self.channel_blocks[0](hidden, torch.cat([real, hidden], dim=1), allowed)  # (B*(N+1), C, D)
        out = out.reshape(batch, n_tokens, n_channels, width).transpose(1, 2)  # (B, C, N+1, D)
        pred = self.head(self.ln_f(out[:, :, 1:]))  # (B, C, N, P): the asset scale, mean 0 / std 1
        return pred.reshape(batch, n_channels, -1).transpose(1, 2)  # (B, L, C)

    @torch.no_grad()
    def hidden_channel_features(self) -> torch.Tensor:
        """(N+1, D) temporal features of a channel with every patch hidden.

        They do not depend on the data (mask tokens and the fallback statistics only), so the blind
        pattern can swap them in for any channel without rerunning the temporal blocks.
        """
        cfg = self.cfg
        x = torch.zeros(1, cfg.window_len, 1)
        hidden = torch.ones(1, 1, cfg.n_patches, dtype=torch.bool)
        return self.temporal_features(x, hidden)[0][0, 0]

    def temporal_tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer that :meth:`temporal_features` reads: where this model's temporal half
        shares storage with a base's, it computes exactly what that base's temporal half computes."""
        tensors = [self.mask_token, self.pos_embed]
        for module in (self.patch_embed, self.stat_embed, self.blocks):
            tensors += [*module.parameters(), *module.buffers()]
        return tensors

    @property
    def cacheable(self) -> bool:
        """True when nothing before the channel blocks trains: temporal features can be computed once."""
        return self._first_trainable_block() == len(self.blocks)

    def _run_block(self, block: nn.Module, seq: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
            # Recompute the block in backward instead of storing its activations.
            return torch.utils.checkpoint.checkpoint(block, seq, use_reentrant=False)
        return block(seq)

    def _first_trainable_block(self) -> int:
        """Index of the first temporal block that (or whose inputs) must be differentiated."""
        embeddings = [self.patch_embed, self.stat_embed]
        if self.mask_token.requires_grad or self.pos_embed.requires_grad or any(
            p.requires_grad for m in embeddings for p in m.parameters()
        ):
            return 0
        for index, block in enumerate(self.blocks):
            if any(p.requires_grad for p in block.parameters()):
                return index
        return len(self.blocks)

    def _channel_tags(self, given: torch.Tensor | None, n_channels: int, x: torch.Tensor) -> torch.Tensor:
        if given is not None:
            tags = given
        elif self.channel_tags.shape[0] == n_channels:
            tags = self.channel_tags
        elif self.channel_tags.shape[0] == 0:
            tags = torch.zeros(n_channels, self.cfg.d_channel, dtype=x.dtype, device=x.device)
        else:
            raise ModelError(
                f"data has {n_channels} channels but this adapter was trained on {self.channel_tags.shape[0]}"
            )
        if tags.dim() == 2:
            tags = tags.unsqueeze(0).expand(x.shape[0], n_channels, tags.shape[-1])
        return tags  # (B, C, d_channel)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def param_summary(cfg: PatchEncoderConfig) -> dict[str, float]:
    """Parameters of a config, without pretrained weights (for sizing decisions)."""
    model = PatchEncoder(cfg)
    n = count_parameters(model)
    return {"parameters": n, "megabytes_fp32": n * 4 / 1e6, "log10": math.log10(n)}
