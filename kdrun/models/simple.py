"""Small networks for the quickstart and tests: CNNs (any input size, any channels) and a tiny token model."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdrun.models.zoo import register_model


class SimpleCNN(nn.Module):
    """``depth`` blocks of conv3x3-BN-ReLU (channels doubling from ``width``; a 2x2 max-pool after every
    block but the last), global average pooling, linear classifier.

    Taps: ``stage1`` .. ``stage<depth>`` (block outputs), ``stage<i>_pre`` (before each block's ReLU),
    ``feat`` (pooled feature).

    Args:
        num_classes: classes. in_channels: input channels. width: channels of the first block.
        depth: number of blocks. norm: ``batch`` (BatchNorm) or ``none`` (a conv bias instead; models
            whose output does not depend on the rest of the batch, e.g. for exact DDP checks on CPU).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, depth: int = 2,
                 norm: str = "batch") -> None:
        super().__init__()
        blocks = []
        c_in = in_channels
        self.taps: dict[str, str] = {}
        for i in range(depth):
            c_out = width * 2**i
            block = nn.Sequential()
            if norm not in ("batch", "none"):
                raise ValueError(f"simple_cnn: norm must be 'batch' or 'none', got '{norm}'")
            block.add_module("conv", nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"))
            block.add_module("bn", nn.BatchNorm2d(c_out) if norm == "batch" else nn.Identity())
            block.add_module("relu", nn.ReLU())
            if i < depth - 1:
                block.add_module("pool", nn.MaxPool2d(2))
            blocks.append(block)
            self.taps[f"stage{i + 1}"] = f"blocks.{i}.relu"
            self.taps[f"stage{i + 1}_pre"] = f"blocks.{i}.bn"
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        self.taps["feat"] = "flatten"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(x))))


@register_model(name="cnn_small", doc="Small 3-block CNN (32-64-128 channels); the quickstart's teacher",
                in_channels="${data.input_shape.0}", width=32, depth=3)
@register_model(name="cnn_tiny", doc="Tiny 2-block CNN (8-16 channels); the quickstart's student",
                in_channels="${data.input_shape.0}", width=8, depth=2)
def simple_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 16, depth: int = 2,
               norm: str = "batch") -> SimpleCNN:
    """Build a :class:`SimpleCNN`."""
    return SimpleCNN(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth, norm=norm)


class TinyTokenLM(nn.Module):
    """A tiny causal language model for tests and synthetic token data: the embeddings of each position's
    token and of the previous one (zeros at t = 0), concatenated, then a two-layer MLP to next-token
    logits. ``forward(input_ids (B, T)) -> (B, T, V)``; no attention and no normalisation (so a micro-batch
    and the full batch compute the same per-token values).

    Taps: ``embed`` (B, T, 2 D), ``feat`` (B, T, H, the hidden layer).
    """

    taps = {"embed": "embed_out", "feat": "act"}

    def __init__(self, num_classes: int = 32, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, dim)
        self.embed_out = nn.Identity()
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        e = self.embed(input_ids)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return self.fc2(self.act(self.fc1(self.embed_out(torch.cat([e, prev], dim=-1)))))


@register_model(doc="Tiny causal token model (current + previous token embeddings, MLP); vocabulary = data.num_classes")
def tiny_token_lm(num_classes: int = 32, dim: int = 16, hidden: int = 32) -> TinyTokenLM:
    """Build a :class:`TinyTokenLM` (``num_classes`` is the vocabulary size)."""
    return TinyTokenLM(num_classes=num_classes, dim=dim, hidden=hidden)


class MLP(nn.Module):
    """Fully connected classifier over one flat input, or two concatenated: ``fc1 -> ReLU -> fc2 -> ReLU ->
    head``. ``in_features`` is an int (``forward(x)``) or a list of two sizes (``forward(x, x2)``: a
    multimodal model reading two views).

    Taps: ``fc1``, ``fc2`` (the linear layers' outputs, before their ReLU), ``feat`` (the input of the head).
    """

    def __init__(self, num_classes: int = 10, in_features: int | list[int] = 32, hidden: list[int] = (64, 32)) -> None:
        super().__init__()
        sizes = [int(in_features)] if isinstance(in_features, int) else [int(n) for n in in_features]
        if len(hidden) != 2 or not 1 <= len(sizes) <= 2:
            raise ValueError(f"mlp: hidden must list two widths and in_features one or two sizes, got {list(hidden)}, {sizes}")
        self.in_features = sizes
        self.fc1, self.act1 = nn.Linear(sum(sizes), int(hidden[0])), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(int(hidden[0]), int(hidden[1])), nn.ReLU()
        self.head = nn.Linear(int(hidden[1]), num_classes)
        self.taps: dict[str, str] = {"fc1": "fc1", "fc2": "fc2", "feat": "act2"}

    def forward(self, x: Tensor, x2: Tensor | None = None) -> Tensor:
        if (x2 is not None) != (len(self.in_features) == 2):
            raise ValueError(f"mlp: built for {len(self.in_features)} input(s) of sizes {self.in_features}; "
                             f"got {'two' if x2 is not None else 'one'}")
        x = x.flatten(1) if x2 is None else torch.cat([x.flatten(1), x2.flatten(1)], dim=1)
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


@register_model(doc="MLP over one flat view (32 values: a digits half-image), fc1 64, fc2 32")
def mlp(num_classes: int = 10, in_features: int = 32, hidden: list[int] = (64, 32)) -> MLP:
    """Build an :class:`MLP` over one input."""
    return MLP(num_classes, in_features, list(hidden))


@register_model(doc="MLP over two flat views (32 + 32 values), fc1 128, fc2 64: a two-modality teacher")
def two_view_mlp(num_classes: int = 10, in_features: list[int] = (32, 32), hidden: list[int] = (128, 64)) -> MLP:
    """Build an :class:`MLP` over two inputs (``forward(x, x2)``)."""
    return MLP(num_classes, list(in_features), list(hidden))
