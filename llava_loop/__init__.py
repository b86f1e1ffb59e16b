"""llava_loop: a plain-PyTorch training loop for finetuning LLaVA-style vision-language models.

Example:
    >>> from llava_loop import fit, LoopConfig
    >>> from llava_loop.testing import tiny_llava, synthetic_vqa
    >>> model, processor = tiny_llava()
    >>> loop = fit(model, processor, synthetic_vqa(32), synthetic_vqa(8, seed=1),
    ...            config=LoopConfig(output_dir="run", max_steps=4))  # doctest: +SKIP
"""

from .callbacks import EVENTS, Callback, DivergenceWarning, EarlyStopping
from .collators import EvalCollator, TrainCollator
from .config import LoopConfig
from .loop import EvalResult, Loop, LoopState, fit
from .planner import MemoryEstimate, estimate_memory
from .plots import plot_run

__all__ = [
    "EVENTS",
    "Callback",
    "DivergenceWarning",
    "EarlyStopping",
    "EvalResult",
    "EvalCollator",
    "Loop",
    "LoopConfig",
    "LoopState",
    "MemoryEstimate",
    "TrainCollator",
    "estimate_memory",
    "fit",
    "plot_run",
]
__version__ = "0.2.0"
