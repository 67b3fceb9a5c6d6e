"""Models of timm (``pip install -e ".[timm]"``) by name, with kdrun's standard taps from timm's feature info.

``timm_model(model_name, num_classes)`` calls ``timm.create_model`` (``pretrained`` is off by default: weights
come through the model's ``checkpoint``, since runs may be offline) and declares:
- ``stage1`` .. ``stageK``: the modules of ``model.feature_info`` (every stage of a CNN, every block of a ViT),
  or those picked by ``stages`` (0-based indices into that list); a stride-2 stem entry of a CNN (ResNet's
  ``act1``) becomes ``stem`` instead;
- ``feat``: the pooled feature, when the model has a ``global_pool`` module (timm's CNNs);
- the model's output is ``logits``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def timm_model(model_name: str, num_classes: int, pretrained: bool = False, stages: Sequence[int] | None = None,
               **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, num_classes=..., pretrained=..., **kwargs)`` with its taps declared."""
    try:
        import timm
    except ImportError:
        raise ImportError('timm models need timm: pip install -e ".[timm]"') from None
    model = timm.create_model(model_name, pretrained=pretrained, num_classes=int(num_classes), **kwargs)
    info = [dict(f) for f in getattr(model, "feature_info", []) or []]
    taps: dict[str, str] = {}
    if info and len(info) > 1 and info[0].get("reduction", 0) <= 2 and not info[0]["module"].startswith(("layer", "blocks", "stages")):
        taps["stem"] = info[0]["module"]
        info = info[1:]
    if stages is not None:
        info = [info[i] for i in stages]
    taps.update({f"stage{i + 1}": f["module"] for i, f in enumerate(info)})
    modules = dict(model.named_modules())
    if "global_pool" in modules:
        taps["feat"] = "global_pool"
    model.taps = {k: v for k, v in taps.items() if v in modules}
    return model
