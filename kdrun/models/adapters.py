"""Small trainable modules that map one network's tensors onto another's (regressors, embeddings).

An adapter is configured under ``adapters`` and publishes ``adapters.<name>``; its ``in_*: auto``
and ``out_*: auto`` arguments are resolved to the channel count (``size(1)``) of its first input and
of its ``target`` tensor; ``*_dim: auto`` to their last dimension (a token's hidden width). Spatial sizes are not resolved that way: pass them explicitly (an
``in_size: auto`` would be read as a channel count).
"""
from __future__ import annotations

from torch import Tensor, nn


def _pair(size: int | tuple[int, int] | list[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and size > 0:
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"ConvRegressor: {name} must be a positive int, a (height, width) pair or None, got {size!r}")


class ConvRegressor(nn.Module):
    """FitNets' hint regressor: conv + BatchNorm (+ ReLU) from the student's feature map to the teacher's.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, train a convolutional regressor on
    the student's guided layer so that its output has the shape of the teacher's hint layer. This
    follows RepDistiller's ``ConvReg`` (the regressor behind the CRD paper's CIFAR-100 FitNet row):
    the layer is chosen from the spatial sizes of the student input (``in_size``) and the teacher
    target (``out_size``):

    - student twice as large (``in = 2 * out``): 3x3 conv, stride 2, padding 1;
    - student half as large (``2 * in = out``): 4x4 transposed conv, stride 2, padding 1;
    - student at least as large (incl. equal): valid conv with kernel ``1 + in - out`` per dimension
      (1x1 when the sizes are equal);
    - anything else (student smaller but not exactly half) cannot be matched: ``ValueError``.

    The two 2x cases are tested first (as in RepDistiller), per dimension for non-square maps.

    Args:
        in_channels: student channels. out_channels: teacher channels.
        in_size: student spatial size (int for square maps, or ``(H, W)``).
        out_size: teacher spatial size. Give both or neither; neither means equal sizes (1x1 conv).
        use_relu: end with ReLU (default True, as RepDistiller's FitNet; teacher stage outputs are
            post-ReLU). ``False`` leaves conv + BN.

    ``forward(x)``: ``(B, in_channels, *in_size) -> (B, out_channels, *out_size)``.
    """

    def __init__(self, in_channels: int, out_channels: int, in_size: int | tuple[int, int] | None = None,
                 out_size: int | tuple[int, int] | None = None, use_relu: bool = True) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"ConvRegressor: channel counts must be positive, got in_channels={in_channels}, "
                             f"out_channels={out_channels}")
        s, t = _pair(in_size, "in_size"), _pair(out_size, "out_size")
        if (s is None) != (t is None):
            raise ValueError(f"ConvRegressor: give both in_size and out_size or neither, got in_size={in_size}, "
                             f"out_size={out_size}")
        if s is None:
            s = t = (1, 1)  # equal sizes: a 1x1 conv, whatever they are
            self.in_size: tuple[int, int] | None = None
            self.out_size: tuple[int, int] | None = None
        else:
            self.in_size, self.out_size = s, t
        assert t is not None
        if s[0] == 2 * t[0] and s[1] == 2 * t[1]:
            conv: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        elif 2 * s[0] == t[0] and 2 * s[1] == t[1]:
            conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
        elif s[0] >= t[0] and s[1] >= t[1]:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=(1 + s[0] - t[0], 1 + s[1] - t[1]))
        else:
            raise ValueError(
                f"ConvRegressor: cannot map a student map of size {s} onto a teacher map of size {t}: the "
                f"student must be twice, half, or at least the teacher's size in both dimensions"
            )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.use_relu = bool(use_relu)
        self.conv = conv
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU() if self.use_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ConvRegressor: expected input (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.in_size is not None and tuple(x.shape[2:]) != self.in_size:
            raise ValueError(f"ConvRegressor: built for input size {self.in_size}, got {tuple(x.shape[2:])}")
        return self.relu(self.bn(self.conv(x)))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, in_size={self.in_size}, "
                f"out_size={self.out_size}, use_relu={self.use_relu}")


class LinearEmbed(nn.Module):
    """Flatten, then one linear layer: ``(B, ...) -> (B, out_features)``.

    RepDistiller's ``LinearEmbed``, the embedding head that its CC (correlation congruence) runs on
    both the student's and the teacher's pooled features (``out_features`` = 128 in the CRD table).

    Args:
        in_features: size of the flattened input. out_features: embedding size (default 128).
    """

    def __init__(self, in_features: int, out_features: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class Projector(nn.Module):
    """One linear map over the last dimension: ``(..., in_dim) -> (..., out_dim)``.

    The learned projection of hidden-state distillation between models of different widths (TinyBERT's
    ``W_h``, Jiao et al. 2020; DistillKit's and TextBrewer's projections): ``student.hidden.<i>`` (B, T, d_s)
    onto the teacher's width d_t. ``in_dim: auto, out_dim: auto`` with ``target: teacher.hidden.<j>``.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.linear = nn.Linear(self.in_dim, self.out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class MLPProjector(nn.Module):
    """Two linear maps with a GELU between, over the last dimension:
    ``(..., in_dim) -> Linear(in_dim, hidden) -> GELU -> Linear(hidden, out_dim)`` (``hidden``
    defaults to ``out_dim``), Xavier-uniform weights and zero biases.

    G2SD's ``decoderfeature_pred`` (Huang et al., CVPR 2023): the student MAE's decoder tokens onto the
    teacher decoder's width (256 -> 512 -> 512 for ViT-S from ViT-B). ``in_dim: auto, out_dim: auto``
    with ``target`` naming the teacher's tensor.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        hidden = int(hidden or out_dim)
        self.fc1, self.act, self.fc2 = nn.Linear(self.in_dim, hidden), nn.GELU(), nn.Linear(hidden, self.out_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
