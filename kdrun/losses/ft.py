"""Factor transfer (FT), with its paraphraser and translator; one term for both of FT's stages."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext, StageInfo
from kdrun.losses.base import LossTerm
from kdrun.losses.features import full_precision, match_spatial, to_float


def _conv_block(c_in: int, c_out: int, bn: bool, transposed: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(c_in, c_out, kernel_size=3, stride=1, padding=1)
    return [conv, nn.BatchNorm2d(c_out) if bn else nn.Identity(), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """FT's paraphraser: a convolutional autoencoder on the teacher's feature map.

    Encoder: three 3x3 convs ``C -> C -> kC -> kC`` (stride 1, LeakyReLU 0.1 after each); decoder: three
    3x3 transposed convs ``kC -> kC -> C -> C`` (LeakyReLU 0.1 after each). ``k`` is the paraphrase rate.
    No BatchNorm by default, as RepDistiller's ``Paraphraser(use_bn=False)`` and the authors' code.
    ``encode(t)`` is the teacher factor; ``forward(t)`` returns ``(factor, reconstruction)``.
    """

    def __init__(self, channels: int, rate: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        mid = int(channels * rate)
        if mid < 1:
            raise ValueError(f"FT: paraphrase rate {rate} leaves no factor channel for {channels} channels")
        self.encoder = nn.Sequential(*_conv_block(channels, channels, use_bn), *_conv_block(channels, mid, use_bn),
                                     *_conv_block(mid, mid, use_bn))
        self.decoder = nn.Sequential(*_conv_block(mid, mid, use_bn, True), *_conv_block(mid, channels, use_bn, True),
                                     *_conv_block(channels, channels, use_bn, True))

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's translator: three 3x3 convs ``C_s -> C_s -> k C_t -> k C_t`` on the student's map, each
    followed by BatchNorm (RepDistiller's ``Translator(use_bn=True)``; the authors' code has none) and
    LeakyReLU 0.1; its output is the student factor, shaped like the teacher factor."""

    def __init__(self, in_channels: int, factor_channels: int, use_bn: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_conv_block(in_channels, in_channels, use_bn),
                                     *_conv_block(in_channels, factor_channels, use_bn),
                                     *_conv_block(factor_channels, factor_channels, use_bn))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class FTLoss(LossTerm):
    """Factor transfer, Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor
    Transfer", NeurIPS 2018, as implemented in RepDistiller (the code behind the CRD paper's table).

    FT runs in two stages, both served by this one term (one instance, one set of modules):

    1. ``paraphraser`` mode (the init stage): the paraphraser, an autoencoder on the teacher's feature map
       ``t``, learns to reconstruct it: ``L_rec = mean((D(E(t)) - t)^2)``. Returns ``{"reconstruction": L_rec}``.
    2. ``transfer`` mode (the main stage): the paraphraser is frozen (its encoder runs without gradient);
       the translator ``T`` maps the student's map to a factor and the student learns to match the teacher
       factor ``E(t)``. With ``phi(f) = normalize(flatten(mean_c f^p1))`` (RepDistiller: the attention map of
       the factor, L2-normalised per sample)::

           L_FT = beta * mean |phi(T(s)) - phi(E(t))|^p2        (p1 = 2, p2 = 1)

       Returns ``{"factor": L_FT}``. Where the two factors' spatial sizes differ the larger is
       adaptive-average-pooled to the smaller.

    Paper vs RepDistiller: the paper (and the authors' code) compares the flattened, L2-normalised factors
    themselves, ``mean |F_s/||F_s|| - F_t/||F_t|| |`` (``factor_map="flat"``); RepDistiller, whose numbers the
    CRD table reports, compares their channel-mean-of-squares maps (``factor_map="attention"``, the
    default). RepDistiller's translator has BatchNorm, the authors' has none (``translator_bn``).

    Which stage is which. kdrun stages pick loss terms by name, so the same term is listed in both
    stages and learns which one is running from :meth:`on_stage_start`: a stage that trains no model
    (``train: []``: only the term's own paraphraser learns, every model stays frozen in eval mode, as in
    RepDistiller's ``init``) runs the paraphraser objective, a stage that trains the student the
    transfer objective. ``init_stage: <name>`` instead selects the paraphraser stage by name, and
    ``mode="paraphraser"`` / ``"transfer"`` pins the objective (then the stage is ignored). With no
    stage announced and no pinned mode the forward computes both parts when gradients are off (the
    builder's trial forward) and raises when they are on, rather than train the wrong objective. In each stage the other objective's modules get no gradient, so the optimizer leaves them
    untouched (PyTorch optimizers skip parameters without ``.grad``). Because the term's weight multiplies
    both objectives, the FT weight is the constructor's ``beta`` and the term's weight stays 1.

    Args:
        beta: weight of the factor loss inside the term (default 200, RepDistiller's CIFAR-100 ``-b 200``;
            the authors used 500 on CIFAR-10).
        rate: paraphrase rate k: factor channels = ``int(k * C_teacher)`` (default 0.5).
        p1: exponent of the factor map (default 2). p2: 1 for L1 (default), else the power of the
            difference.
        factor_map: ``"attention"`` (default, RepDistiller) or ``"flat"`` (paper, authors' code).
        translator_bn: BatchNorm in the translator (default True, RepDistiller).
        init_stage: the name of the stage that trains the paraphraser (default ``None``: the stage that
            trains no model).
        mode: ``None`` (default: chosen by the stage), ``"paraphraser"`` or ``"transfer"``.

    CIFAR-100 table of the CRD paper (RepDistiller ``--distill factor -a 0 -b 200``): stage ``init``, 30
    epochs, trains only the paraphraser (SGD lr 0.01 for ResNet/WRN students, else 0.05 -- 0.01 for
    MobileNetV2/ShuffleNet --, momentum 0.9, weight decay 5e-4, no schedule, no cross-entropy); then the
    main 240-epoch stage with cross-entropy weight 1 plus this term (weight 1, ``beta`` 200), no KD term;
    the translator trains with the student. Inputs: ``student``, ``teacher``: the output of the last stage
    (``stageK``, post-ReLU; RepDistiller's ``feat[-2]``), (B, C, H, W). The init stage lists
    ``train: []``: student and teacher run frozen in eval mode (their BatchNorm statistics do not move).
    """

    MODES = ("paraphraser", "transfer")

    def __init__(self, beta: float = 200.0, rate: float = 0.5, p1: float = 2.0, p2: float = 1.0,
                 factor_map: str = "attention", translator_bn: bool = True, init_stage: str | None = None,
                 mode: str | None = None) -> None:
        super().__init__()
        if factor_map not in ("attention", "flat"):
            raise ValueError(f"FT: factor_map must be 'attention' or 'flat', got {factor_map!r}")
        if mode is not None and mode not in self.MODES:
            raise ValueError(f"FT: mode must be None, 'paraphraser' or 'transfer', got {mode!r}")
        if not 0 < rate:
            raise ValueError(f"FT: rate must be positive, got {rate}")
        self.beta = float(beta)
        self.rate = float(rate)
        self.p1 = float(p1)
        self.p2 = float(p2)
        self.factor_map = factor_map
        self.translator_bn = bool(translator_bn)
        self.init_stage = init_stage
        self.pinned_mode = mode
        self.mode: str | None = mode
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    # ------------------------------------------------------------------------------ build time / stages
    def setup(self, ctx: BuildContext) -> None:
        """Create the paraphraser (on the teacher's channels) and the translator (student -> factor)."""
        shapes = ctx.shapes
        self.check_shapes(**{k: shapes[k] for k in ("student", "teacher")})
        c_s, c_t = tuple(shapes["student"])[1], tuple(shapes["teacher"])[1]
        self.paraphraser = Paraphraser(c_t, self.rate)
        self.translator = Translator(c_s, int(c_t * self.rate), use_bn=self.translator_bn)

    def on_stage_start(self, stage: StageInfo) -> None:
        """Select the objective of the stage that starts: the paraphraser's where no model trains (or in
        the stage named ``init_stage``), else the transfer objective."""
        if self.pinned_mode is None:
            init = stage.name == self.init_stage if self.init_stage is not None else not stage.trained_models
            self.mode = "paraphraser" if init else "transfer"

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        if len(student) != 4 or len(teacher) != 4 or student[0] != teacher[0]:
            raise ValueError(f"FT: 'student' {tuple(student)} and 'teacher' {tuple(teacher)} must be (batch, channels, "
                             f"height, width) maps with the same batch size")
        if int(teacher[1] * self.rate) < 1:
            raise ValueError(f"FT: rate {self.rate} leaves no factor channel for 'teacher' {tuple(teacher)}")
        if self.paraphraser is not None and self.translator is not None:
            c_t = self.paraphraser.encoder[0].in_channels
            c_s = self.translator.encoder[0].in_channels
            if (c_s, c_t) != (student[1], teacher[1]):
                raise ValueError(f"FT: set up for {c_s} student and {c_t} teacher channels, got 'student' "
                                 f"{tuple(student)} and 'teacher' {tuple(teacher)}")

    # ------------------------------------------------------------------------------ objectives
    def factor(self, f: Tensor) -> Tensor:
        """``phi(f)``: (B, C, H, W) -> L2-normalised (B, -1) vector."""
        if self.factor_map == "attention":
            f = f.pow(self.p1).mean(dim=1)
        return F.normalize(f.flatten(1), dim=1)

    def reconstruction_loss(self, teacher: Tensor) -> Tensor:
        assert self.paraphraser is not None
        _, rec = self.paraphraser(teacher)
        return F.mse_loss(rec, teacher)

    def transfer_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        assert self.paraphraser is not None and self.translator is not None
        with torch.no_grad():
            factor_t = self.paraphraser.encode(teacher)
        factor_s = self.translator(student)
        factor_s, factor_t = match_spatial(factor_s, factor_t)
        diff = self.factor(factor_s) - self.factor(factor_t)
        loss = diff.abs().mean() if self.p2 == 1 else diff.pow(self.p2).mean()
        return self.beta * loss

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        if self.paraphraser is None or self.translator is None:
            raise RuntimeError("FT: the paraphraser and translator do not exist yet: call setup(ctx) first")
        with full_precision(student):
            s, t = to_float(student), to_float(teacher).detach()
            if self.mode == "paraphraser":
                return {"reconstruction": self.reconstruction_loss(t)}
            if self.mode == "transfer":
                return {"factor": self.transfer_loss(s, t)}
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "FT: no stage selected: the engine calls on_stage_start(stage) when a stage starts (the stage "
                    "that trains no model trains the paraphraser, the others transfer), or pin the objective "
                    "with mode='paraphraser' or mode='transfer'"
                )
            return {"reconstruction": self.reconstruction_loss(t), "factor": self.transfer_loss(s, t)}

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, rate={self.rate}, p1={self.p1}, p2={self.p2}, factor_map={self.factor_map!r}, "
                f"init_stage={self.init_stage!r}, mode={self.mode!r}")


__all__ = ["FTLoss", "Paraphraser", "Translator"]
