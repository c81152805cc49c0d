"""triton-adam: the whole Adam/AdamW step of a model in one Triton launch.

``triton_adam.Adam`` and ``triton_adam.AdamW`` are drop-in replacements for ``torch.optim.Adam``
and ``torch.optim.AdamW``; ``clip_grad_norm_`` for ``torch.nn.utils.clip_grad_norm_``.
"""
from .clip import clip_grad_norm_
from .optimizer import Adam, AdamW
from .param_groups import normalized_weight_decay, param_groups

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "clip_grad_norm_", "normalized_weight_decay", "param_groups",
           "__version__"]
