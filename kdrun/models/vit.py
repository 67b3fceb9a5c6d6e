"""A small Vision Transformer for 32x32 inputs (CIFAR), in the style of timm's ``VisionTransformer``.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021: the image is cut into p x p patches (p = 4 here: 8 x 8 = 64 tokens, the grid of a CIFAR
ResNet's last stage), each linearly embedded; a learned class token and learned position embeddings
are added; pre-norm transformer blocks (multi-head self-attention and a GELU MLP, each with a
residual connection); a final LayerNorm; the class token (or the mean of the patch tokens) feeds a
linear classifier.

Taps (module paths whose forward output is the tensor; see :mod:`kdrun.taps`):

- ``stem``: the patch embeddings (B, 64, D), before the position embeddings;
- ``stage1`` .. ``stageK``: the patch tokens (B, 64, D) (class token removed) after the blocks at equal
  depth fractions ``round(i * depth / K)``, ``K = num_stages`` (3 by default, like a CIFAR ResNet);
  these are the residual stream, before any final norm;
- ``tokens``: the final patch tokens (B, 64, D) after the last norm, class token removed (what TRG reads
  from a ViT);
- ``feat``: the pooled feature (B, D) the head reads (the class token, or the token mean with
  ``pool="mean"``).

``stage*`` and ``tokens`` are parameter-free ``nn.Identity`` modules that the forward calls on the
slice without the class token, so a forward hook sees exactly that tensor.

Builders: :func:`vit_tiny` (DeiT-Ti widths, 9 blocks: 4,045,540 parameters with 100 classes) and
:func:`vit_small` (the CIFAR ViT of omihub777/ViT-CIFAR: 6,303,460 parameters with 100 classes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.models.zoo import register_model


class PatchEmbed(nn.Module):
    """``p x p`` patches -> tokens: a stride-p convolution, flattened to (B, N, D) in row-major order."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, dim: int = 192) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"vit: img_size {img_size} is not divisible by patch_size {patch_size}")
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (fused ``scaled_dot_product_attention``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vit: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with a class token, learned position embeddings and pre-norm blocks (see the module docstring).

    Args:
        num_classes: classes. img_size: input side (square). patch_size: p. in_chans: input channels.
        dim: token width D. depth: blocks. num_heads: attention heads. mlp_ratio: MLP hidden / D.
        qkv_bias: bias in the q, k, v projection. drop_rate: dropout after the embeddings, in the MLP
            and after the attention projection. attn_drop_rate: attention dropout. drop_path_rate:
            stochastic depth, rising linearly to this value over the blocks.
        pool: ``cls`` (class token, default), ``mean`` (mean of the final, normalised patch tokens) or
            ``avg_fc_norm`` (MAE's fine-tuning "global pool": ``fc_norm(mean of the patch tokens)``, no
            final norm; the parameter names of MAE's fine-tuned checkpoints) for the head.
        num_stages: how many ``stage<i>`` taps to publish (at equal depth fractions).
        norm_eps: the LayerNorms' epsilon (1e-5, PyTorch's default; MAE and timm's ViTs use 1e-6).
        head_init_std: the standard deviation of the head's initial weights (0.02; MAE's fine-tuning
            uses 2e-5).
    """

    def __init__(self, num_classes: int = 100, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 dim: int = 192, depth: int = 9, num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 pool: str = "cls", num_stages: int = 3, norm_eps: float = 1e-5, head_init_std: float = 0.02) -> None:
        super().__init__()
        if pool not in ("cls", "mean", "avg_fc_norm"):
            raise ValueError(f"vit: pool must be 'cls', 'mean' or 'avg_fc_norm', got '{pool}'")
        if not 1 <= num_stages <= depth:
            raise ValueError(f"vit: num_stages must be in [1, depth={depth}], got {num_stages}")
        self.pool = pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i], norm_eps) for i in range(depth))
        # block index (0-based) after which stage i+1 is published
        self.stage_blocks = [round((i + 1) * depth / num_stages) - 1 for i in range(num_stages)]
        self.stage_taps = nn.ModuleList(nn.Identity() for _ in range(num_stages))
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if pool != "avg_fc_norm" else nn.Identity()
        if pool == "avg_fc_norm":
            self.fc_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.token_out = nn.Identity()
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        self.taps: dict[str, str] = {"stem": "patch_embed"}
        self.taps.update({f"stage{i + 1}": f"stage_taps.{i}" for i in range(num_stages)})
        self.taps.update({"tokens": "token_out", "feat": "pre_logits"})
        self._init_weights()
        if head_init_std != 0.02:  # (a second draw only when asked: the default keeps the generator's sequence)
            nn.init.trunc_normal_(self.head.weight, std=head_init_std)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """Images -> the final token sequence (B, 1 + N [+ E], D): class token, patch tokens and the
        ``extra`` tokens (E, D) appended after the position embeddings (a distillation token); the
        ``stage*`` and ``tokens`` taps see the patch tokens only."""
        x = self.patch_embed(x)
        n = x.shape[1]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if extra is not None:
            x = torch.cat([x, extra.expand(x.shape[0], -1, -1)], dim=1)
        x = self.pos_drop(x)
        stage = 0
        for i, block in enumerate(self.blocks):
            x = block(x)
            if stage < len(self.stage_blocks) and i == self.stage_blocks[stage]:
                self.stage_taps[stage](x[:, 1:1 + n])
                stage += 1
        x = self.norm(x)
        self.token_out(x[:, 1:1 + n])
        return x

    def pool_tokens(self, x: Tensor, n: int) -> Tensor:
        """The feature the head reads, from the final sequence with ``n`` patch tokens."""
        if self.pool == "cls":
            return x[:, 0]
        mean = x[:, 1:1 + n].mean(dim=1)
        return self.fc_norm(mean) if self.pool == "avg_fc_norm" else mean

    def forward_features(self, x: Tensor) -> Tensor:
        """Input images -> the pooled feature (B, D) the head reads."""
        return self.pre_logits(self.pool_tokens(self.encode(x), self.patch_embed.num_patches))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


@register_model(doc=("ViT-Tiny for 32x32 inputs (Dosovitskiy et al. 2021): patch 4 (64 "
                     "tokens), D 192, 9 blocks, 3 heads; 4.0M params"))
def vit_tiny(num_classes: int = 100, **kwargs) -> VisionTransformer:
    """ViT-Tiny for 32x32 inputs: patch 4 (64 tokens), D = 192, 3 heads, MLP ratio 4 (DeiT-Ti's widths,
    Touvron et al. 2021) and 9 blocks (chosen: DeiT-Ti has 12; 9 keeps it near 4M parameters for
    CIFAR). 4,045,540 parameters with 100 classes."""
    cfg = dict(patch_size=4, dim=192, depth=9, num_heads=3, mlp_ratio=4.0)
    cfg.update(kwargs)
    return VisionTransformer(num_classes=num_classes, **cfg)


@register_model(doc=("ViT-Small for 32x32 inputs (omihub777/ViT-CIFAR settings): patch 4 "
                     "(64 tokens), D 384, 7 blocks, 12 heads; 6.3M params"))
def vit_small(num_classes: int = 100, **kwargs) -> VisionTransformer:
    """ViT-Small for 32x32 inputs: patch 4 (64 tokens), D = 384, 7 blocks, 12 heads, MLP hidden 384
    (ratio 1): the settings of omihub777/ViT-CIFAR (6.3M parameters, 91.0% on CIFAR-10 with its
    recipe: Adam lr 1e-3, 200 epochs, AutoAugment, label smoothing 0.1). 6,303,460 parameters with 100
    classes."""
    cfg = dict(patch_size=4, dim=384, depth=7, num_heads=12, mlp_ratio=1.0)
    cfg.update(kwargs)
    return VisionTransformer(num_classes=num_classes, **cfg)


__all__ = ["Attention", "Block", "DropPath", "Mlp", "PatchEmbed", "VisionTransformer", "vit_small", "vit_tiny"]
