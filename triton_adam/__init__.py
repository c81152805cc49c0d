"""triton-adam: the whole Adam/AdamW step of a model in one Triton launch.

``triton_adam.Adam`` and ``triton_adam.AdamW`` are drop-in replacements for ``torch.optim.Adam``
and ``torch.optim.AdamW``.
"""
from .optimizer import Adam, AdamW

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "__version__"]
