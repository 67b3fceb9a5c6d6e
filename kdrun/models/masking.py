"""Feature masks inserted into a model's forward: MST-Distill's mask networks.

Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025 (arXiv 2507.07015; code Gray-OREO/MST-Distill, ``KD_methods/MST.py``): a mask network reads the
output ``h`` (B, D) of one layer of a trained teacher and multiplies it by a per-feature gate,
``h <- h * sigmoid(m(h))``; the rest of the teacher runs on the masked feature. Trained (with the
teacher frozen) so that the masked teacher's prediction moves towards the student's, it suppresses
what the student's modality cannot see ("modality-specific discrepancies").

``m`` (:class:`FeatureMask`, the code's ``MaskNet_1d``): each of the D features is embedded to width
``w = D // (2 heads) * heads`` by one linear map of the whole vector (D -> D w, reshaped to D tokens of
width w), multi-head self-attention over the D tokens, a linear map of each token to one logit, a sigmoid.

:func:`with_feature_mask` adds a mask to a built model at a module path without renaming its
parameters (the mask is the submodule ``feature_mask``; a forward hook applies it), so
``init_weights: {masked: teacher}`` copies the trained teacher in and the mask keeps its initialisation.
The model's own parameters are frozen (``requires_grad=False`` at build, which kdrun keeps for the whole
run): a stage that trains the masked model trains its mask only.
"""
from __future__ import annotations

from torch import Tensor, nn


class FeatureMask(nn.Module):
    """``sigmoid(m(h))`` (B, D) for features ``h`` (B, D) (see the module docstring); ``heads`` 3 (the
    code's ``mask_head_num`` default)."""

    def __init__(self, dim: int, heads: int = 3) -> None:
        super().__init__()
        width = int(dim) // (2 * int(heads)) * int(heads)
        if width < int(heads):
            raise ValueError(f"feature mask: {dim} features are too few for {heads} heads (width {width})")
        self.dim, self.width = int(dim), width
        self.embed = nn.Linear(self.dim, self.dim * width)
        self.attention = nn.MultiheadAttention(width, int(heads), batch_first=True)
        self.out = nn.Linear(width, 1)

    def forward(self, h: Tensor) -> Tensor:
        tokens = self.embed(h.flatten(1)).view(h.shape[0], self.dim, self.width)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.out(mixed).squeeze(-1).sigmoid()

    def apply_to(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """The forward hook: the layer's output times its mask (a bound method, so copies of the model
        call their own mask)."""
        mask = self(output)
        return output * mask.view(*mask.shape, *([1] * (output.dim() - mask.dim())))


def with_feature_mask(net: nn.Module, at: str, heads: int = 3) -> nn.Module:
    """``net`` with a :class:`FeatureMask` applied to the output of its module ``at`` (flat features (B, D);
    D is read from the module's ``out_features``); ``net``'s own parameters frozen."""
    modules = dict(net.named_modules())
    if at not in modules:
        raise ValueError(f"with_feature_mask: {type(net).__name__} has no module '{at}' "
                         f"(its modules: {', '.join(m for m in modules if m)})")
    dim = getattr(modules[at], "out_features", None)
    if dim is None:
        raise ValueError(f"with_feature_mask: module '{at}' ({type(modules[at]).__name__}) has no out_features; "
                         f"masks go on linear layers' flat outputs")
    for p in net.parameters():
        p.requires_grad_(False)
    mask = FeatureMask(dim, heads)
    net.add_module("feature_mask", mask)
    modules[at].register_forward_hook(mask.apply_to)
    return net


__all__ = ["FeatureMask", "with_feature_mask"]
