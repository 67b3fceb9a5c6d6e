"""A network with a DINO-style projection head on one of its taps.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021, project
the backbone's embedding through an MLP, an L2-normalised bottleneck and a weight-normalised linear
layer onto many output units; Sarnthein et al., "Random Teachers are Good Teachers", ICML 2023,
distil a random teacher through such a head (their code: hidden 2048-2048, bottleneck 256, 65536
outputs, GELU, cross-entropy between the two softmaxes at temperature 1).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``x -> MLP (Linear + GELU per hidden layer) -> Linear -> L2-normalise -> W_n x`` where ``W_n``
    has unit-norm rows (no bias): the outputs are cosine similarities in [-1, 1].

    Args:
        in_features: embedding size. hidden_dims: MLP widths (default 2048, 2048).
        bottleneck_dim: default 256. out_dim: default 65536.
    """

    def __init__(self, in_features: int, hidden_dims: list[int] | tuple[int, ...] = (2048, 2048),
                 bottleneck_dim: int = 256, out_dim: int = 65536) -> None:
        super().__init__()
        dims = [int(in_features), *(int(d) for d in hidden_dims)]
        layers: list[nn.Module] = []
        for i, o in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(i, o), nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.bottleneck = nn.Linear(dims[-1], int(bottleneck_dim))
        self.last = nn.Linear(int(bottleneck_dim), int(out_dim), bias=False)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.bottleneck(self.mlp(x.flatten(1))), dim=-1)
        return F.linear(z, F.normalize(self.last.weight, dim=-1))


class WithProjectionHead(nn.Module):
    """``backbone`` whose output is replaced by a :class:`ProjectionHead` on its tap ``tap``.

    The backbone's taps stay available under their names (``feat``, ``stage1``, ...: the linear probe
    reads ``feat``); the model's output (``<model>.logits``) is the head's. ``in_features`` of the head
    is found with one forward on ``input_shape``, which also finds the backbone's modules that do not
    feed the tap (its classifier): they are replaced by ``nn.Identity``, so that every parameter of
    the model gets a gradient (DDP needs no unused-parameter search) and none is trained in vain.

    Args:
        backbone: a zoo model (nested ``_target_``), or a model config ``{name, net}`` whose ``net`` is
            one (so that ``/model@<model>.net.backbone: vgg11`` selects a zoo entry). tap: the tap the
            head reads (default ``feat``).
        input_shape: (C, H, W) of the data (to size the head). hidden_dims, bottleneck_dim, out_dim: the head's.
    """

    def __init__(self, backbone: nn.Module | dict, input_shape: list[int], tap: str = "feat",
                 hidden_dims: list[int] | tuple[int, ...] = (2048, 2048), bottleneck_dim: int = 256,
                 out_dim: int = 65536) -> None:
        super().__init__()
        if isinstance(backbone, dict):
            backbone = backbone.get("net")
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"WithProjectionHead: 'backbone' must be a model (a _target_ node), got {type(backbone).__name__}")
        taps = dict(getattr(backbone, "taps", {}) or {})
        if tap not in taps:
            raise ValueError(f"WithProjectionHead: the backbone {type(backbone).__name__} has no tap '{tap}' "
                             f"(its taps: {', '.join(taps) or 'none'})")
        self.backbone = backbone
        self.taps = {name: f"backbone.{path}" if path else "backbone" for name, path in taps.items()}
        self._tap_module = backbone.get_submodule(taps[tap]) if taps[tap] else backbone
        self._captured: Tensor | None = None
        self._tap_module.register_forward_hook(self._capture)
        import torch

        was = backbone.training
        backbone.eval()
        backbone(torch.randn(2, *[int(s) for s in input_shape]))
        backbone.train(was)
        feat, self._captured = self._captured, None
        assert feat is not None
        params = dict(backbone.named_parameters())
        grads = torch.autograd.grad(feat.sum(), list(params.values()), allow_unused=True)
        unused = {name for name, g in zip(params, grads) if g is None}
        for mname, module in list(backbone.named_modules()):
            own = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters()]
            if mname and own and all(p in unused for p in own):
                parent, _, child = mname.rpartition(".")
                setattr(backbone.get_submodule(parent) if parent else backbone, child, nn.Identity())
                unused -= set(own)
        self.head = ProjectionHead(feat.flatten(1).shape[1], hidden_dims, bottleneck_dim, out_dim)

    def _capture(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._captured = output

    def forward(self, x: Tensor) -> Tensor:
        self.backbone(x)
        feat, self._captured = self._captured, None
        return self.head(feat)


class AuxiliaryHead(nn.Module):
    """A second classifier on a student's pooled feature, used only in training (DHKD's auxiliary head,
    Yang et al., "Dual-Head Knowledge Distillation", arXiv 2411.08937): ``nonlinear`` (the CIFAR setting)
    ``Linear(D, hidden) -> Dropout -> BatchNorm1d -> ReLU -> Linear(hidden, C)``, or ``linear`` (ImageNet)
    one ``Linear(D, C)``. As an adapter (``adapters.<name>``) it is not part of the exported student.

    Args:
        in_features: the feature size (``auto``). num_classes: C. kind: ``nonlinear`` (default) or ``linear``.
        hidden: the nonlinear head's width (default 200). dropout: default 0.1.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "nonlinear", hidden: int = 200,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in ("nonlinear", "linear"):
            raise ValueError(f"auxiliary head: kind must be nonlinear or linear, got {kind!r}")
        d, c = int(in_features), int(num_classes)
        self.head = (nn.Linear(d, c) if kind == "linear" else
                     nn.Sequential(nn.Linear(d, hidden), nn.Dropout(dropout), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                   nn.Linear(hidden, c)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.flatten(1))
