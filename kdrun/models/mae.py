"""Masked autoencoders and a ViT with a distillation token: the models of G2SD.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022: the image is cut into
patches, a random ``mask_ratio`` of them (75%) is removed, a ViT encoder sees the visible patches
only (plus a class token), and a light decoder sees the encoded visible tokens with a learned mask
token at every removed position (fixed 2-D sine-cosine position embeddings in both) and predicts
the pixels. Which patches are removed is the argsort of a per-sample uniform ``noise`` (B, N): the
smallest ``N (1 - mask_ratio)`` are kept. Passing the same ``noise`` to two models masks them
identically, which G2SD's generic stage needs (teacher and student see the same visible patches);
:class:`kdrun.data.mix.PatchMaskNoise` puts one draw per step in ``batch.mask_noise``.

Outputs (a dict; :mod:`kdrun.model_io` names them ``<model>.<key>``):

- ``decoder_hidden``: (B, 1 + N, D_dec) the decoder's tokens (class token first, then every patch
  in image order) after its first ``decoder_layers_out`` blocks (default: all), before the decoder
  norm: the features G2SD distils (its teacher stops after 4 of its 8 decoder blocks);
- ``mask``: (B, N), 1 where the patch was removed;
- ``pixels``: (B, N, p^2 C) the pixel predictions (only when every decoder block runs).

Parameter names follow the MAE code (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``decoder_*``), so its
published checkpoints load, and the encoder's names are those of
:class:`kdrun.models.vit.VisionTransformer`: ``stages.<s>.init_weights: {student: mae_student}`` starts
a classifier from a trained MAE's encoder.

:class:`DistilledVisionTransformer` is DeiT's ViT with a distillation token (Touvron et al.,
"Training data-efficient image transformers & distillation through attention", ICML 2021) as G2SD
builds it: a learned token appended after the position embeddings (it has none), its own linear head
``head_dist``; outputs ``cls_logits`` (the class token's head), ``dist_logits`` (the distillation
token's head) and ``logits``, their mean (what G2SD evaluates).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdrun.models.vit import Block, PatchEmbed, VisionTransformer
from kdrun.models.zoo import register_model


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """MAE's fixed 2-D sine-cosine position embeddings, (1 [+ 1] + grid^2, dim): the first half of the
    channels encodes a patch's column, the second its row, each as ``[sin(pos w_k), cos(pos w_k)]``
    with ``w_k = 10000^(-k / (dim / 4))``, k < dim / 4; the class token's row is zero."""
    if dim % 4:
        raise ValueError(f"mae: the embedding width {dim} must be divisible by 4 (2-D sine-cosine embeddings)")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([axis(cols), axis(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """A masked autoencoder with a ViT encoder (see the module docstring).

    Args:
        img_size, patch_size, in_chans: the input (square images of ``img_size``). dim, depth,
            num_heads: the encoder. decoder_dim, decoder_depth, decoder_heads: the decoder.
        mlp_ratio: MLP hidden / width in every block. mask_ratio: the share of patches removed (0.75).
        decoder_layers_out: how many decoder blocks run (default all; G2SD's teacher: 4).
        norm_eps: the LayerNorms' epsilon (1e-6, as MAE).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, dim: int = 768, depth: int = 12,
                 num_heads: int = 12, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mlp_ratio: float = 4.0, mask_ratio: float = 0.75, decoder_layers_out: int | None = None,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mae: mask_ratio must be in [0, 1), got {mask_ratio}")
        if decoder_layers_out is not None and not 1 <= decoder_layers_out <= decoder_depth:
            raise ValueError(f"mae: decoder_layers_out must be in [1, decoder_depth={decoder_depth}], got {decoder_layers_out}")
        self.mask_ratio = float(mask_ratio)
        self.decoder_layers_out = decoder_layers_out or decoder_depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        n, grid = self.patch_embed.num_patches, self.patch_embed.grid
        self.num_patches = n
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, grid), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, True, norm_eps=norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_dim, grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio, True, norm_eps=norm_eps)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self.taps: dict[str, str] = {"stem": "patch_embed", "encoded": "norm"}
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: the patch projection like a linear layer (Xavier-uniform on its
        flattened weight), the class and mask tokens N(0, 0.02), linear layers Xavier-uniform with
        zero bias, LayerNorms at (1, 0)."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def masking(self, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(kept patch indices (B, K), the mask (B, N) with 1 = removed, the order that undoes the
        shuffle (B, N)) from per-sample noise (B, N): the K = int(N (1 - mask_ratio)) lowest are kept."""
        b, n = noise.shape
        keep = int(n * (1 - self.mask_ratio))
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        mask = torch.ones(b, n, device=noise.device)
        mask[:, :keep] = 0
        return shuffle[:, :keep], torch.gather(mask, 1, restore), restore

    def forward(self, images: Tensor, noise: Tensor | None = None) -> dict[str, Tensor]:
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        b, n, d = x.shape
        if noise is None:
            noise = torch.rand(b, n, device=x.device)
        elif tuple(noise.shape) != (b, n):
            raise ValueError(f"mae: noise must be (batch, patches) = ({b}, {n}), got {tuple(noise.shape)}")
        kept, mask, restore = self.masking(noise)
        x = torch.gather(x, 1, kept.unsqueeze(-1).expand(-1, -1, d))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        fill = self.mask_token.expand(b, n - kept.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks[:self.decoder_layers_out]:
            x = block(x)
        out = {"decoder_hidden": x, "mask": mask}
        if self.decoder_layers_out == len(self.decoder_blocks):
            out["pixels"] = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return out


class DistilledVisionTransformer(VisionTransformer):
    """:class:`~kdrun.models.vit.VisionTransformer` with DeiT's distillation token (see the module
    docstring): outputs ``{logits, cls_logits, dist_logits}``, ``logits = (cls_logits + dist_logits) / 2``.
    Takes VisionTransformer's arguments; ``pool`` must be ``cls``."""

    def __init__(self, num_classes: int = 100, **kwargs) -> None:
        if kwargs.get("pool", "cls") != "cls":
            raise ValueError("vit (distilled): the class and distillation tokens feed the heads; pool must be 'cls'")
        super().__init__(num_classes=num_classes, **kwargs)
        dim = self.cls_token.shape[-1]
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head_dist = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
        nn.init.zeros_(self.head_dist.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        tokens = self.encode(x, self.dist_token)
        cls = self.head(self.pre_logits(tokens[:, 0]))
        dist = self.head_dist(tokens[:, -1])
        return {"logits": (cls + dist) / 2, "cls_logits": cls, "dist_logits": dist}


# G2SD's ImageNet models (patch 16 at 224 px; widths of MAE's ViT-B and of G2SD's ViT-S student)
_BASE = dict(dim=768, depth=12, num_heads=12)
_SMALL = dict(dim=384, depth=12, num_heads=6)


@register_model(doc="MAE ViT-B/16 with its 8-block 512-wide decoder (He et al. 2022), 224 px; 111.9M params")
def mae_vit_base_patch16(num_classes: int = 0, **kwargs) -> MaskedAutoencoder:
    """MAE's ``mae_vit_base_patch16``: encoder ViT-B/16, decoder 512 wide, 8 blocks, 16 heads.
    ``num_classes`` is ignored (a masked autoencoder has no class head)."""
    return MaskedAutoencoder(**{**_BASE, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16, **kwargs})


@register_model(doc="MAE ViT-S/16 with a 4-block 256-wide decoder (G2SD's generic-stage student), 224 px")
def mae_vit_small_patch16_dec256d4b(num_classes: int = 0, **kwargs) -> MaskedAutoencoder:
    """G2SD's ``mae_vit_small_patch16_dec256d4b``: encoder ViT-S/16, decoder 256 wide, 4 blocks, 8 heads."""
    return MaskedAutoencoder(**{**_SMALL, "decoder_dim": 256, "decoder_depth": 4, "decoder_heads": 8, **kwargs})


@register_model(doc="ViT-S/16 with a distillation token (DeiT; G2SD's specific-stage student), 224 px")
def vit_small_patch16_distilled(num_classes: int = 1000, **kwargs) -> DistilledVisionTransformer:
    """ViT-S/16 (224 px, LayerNorm eps 1e-6) with a distillation token and its head, as G2SD's
    ``vit_small_patch16(distillation=True)``."""
    cfg = dict(img_size=224, patch_size=16, norm_eps=1e-6, **_SMALL)
    cfg.update(kwargs)
    return DistilledVisionTransformer(num_classes=num_classes, **cfg)


@register_model(doc="ViT-B/16 with MAE's fine-tuning global pool (fc_norm of the mean token), 224 px")
def vit_base_patch16_gap(num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/16 (224 px, eps 1e-6) classifying ``fc_norm(mean of the patch tokens)``: the parameter
    names of MAE's fine-tuned ViT-B checkpoints (G2SD's specific-stage teacher)."""
    cfg = dict(img_size=224, patch_size=16, norm_eps=1e-6, pool="avg_fc_norm", **_BASE)
    cfg.update(kwargs)
    return VisionTransformer(num_classes=num_classes, **cfg)


__all__ = ["DistilledVisionTransformer", "MaskedAutoencoder", "mae_vit_base_patch16", "mae_vit_small_patch16_dec256d4b",
           "sincos_pos_embed", "vit_base_patch16_gap", "vit_small_patch16_distilled"]
