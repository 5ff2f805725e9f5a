"""Features of a named layer of any torchvision or timm model, computing nothing after that layer."""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    pass


class FeatureTap:
    """``tap(x)`` runs ``model`` on ``x`` up to the module named ``layer`` and returns its output.

    A forward hook on that module keeps its output and stops the forward pass there (so the layers
    after it cost nothing). Works for any ``nn.Module`` whose forward calls the named submodule,
    traceable by torch.fx or not. Parameters are the model's own (nothing is copied).

    Args:
        model: the network (e.g. ``torchvision.models.resnet18()`` or a timm model).
        layer: a name from ``model.named_modules()``, e.g. ``"layer3"`` (ResNet stage 3) or
            ``"stages.2"`` (timm ConvNeXt).
    """

    def __init__(self, model: nn.Module, layer: str):
        self.model = model
        self.layer = layer
        try:
            self.module = model.get_submodule(layer)
        except AttributeError:
            names = [name for name, _ in model.named_children()]
            raise ValueError(
                f"feature_layer={layer!r} is not a module of {type(model).__name__}; "
                f"its top-level modules are {names} (nested names use dots, e.g. 'layer3' or 'stages.2')"
            ) from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        box = []

        def keep(module, inputs, output):
            box.append(output)
            raise _Stop

        handle = self.module.register_forward_hook(keep)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not box:
            raise ValueError(f"the model's forward never called {self.layer!r}; choose a layer on its forward path")
        out = box[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{self.layer!r} outputs {got}; the Mix Block needs an N x C x h x w feature map "
                "(pick a CNN stage, e.g. 'layer3')"
            )
        return out
