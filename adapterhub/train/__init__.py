"""Transfer learning on a frozen backbone: strategies from the literature and the loop that runs them.

from adapterhub import train
result = train.fit(model, train.AdapterTuning("lora", {"r": 8}), examples, tokenizer=tok,
                   eval=held_out, epochs=3, output_dir="runs/lora")   # or options=train.FitOptions(...)
"""

from .data import CAUSAL_LM, CLASSIFICATION
from .errors import TrainingError
from .groups import layer_groups
from .loop import FitOptions, FitResult, evaluate, fit
from .strategies import (
    AdapterTuning,
    DiscriminativeLR,
    DomainAdaptation,
    FeatureExtraction,
    FullFineTuning,
    ProgressiveUnfreezing,
    Strategy,
)

__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "AdapterTuning",
    "DiscriminativeLR",
    "DomainAdaptation",
    "FeatureExtraction",
    "FitOptions",
    "FitResult",
    "FullFineTuning",
    "ProgressiveUnfreezing",
    "Strategy",
    "TrainingError",
    "evaluate",
    "fit",
    "layer_groups",
]
