"""What is compared: one row per way of getting a classifier, with its learning rate.

Every contender trains for the same epochs at each training-set size (EPOCHS), batch 16, seed 0.
Learning rates were picked by final training loss and accuracy on the "seen" split (held-out
sentences in the training words) among 1e-2/3e-2 (feature extraction), 1e-3/3e-3 (bottleneck),
3e-5/1e-4 (full fine-tuning) at 50 examples, and 1e-4/3e-4/1e-3 for the from-scratch model at
1000 (it learns nothing at 1e-3 or 1e-4); the others kept the first value tried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapterhub import train

EPOCHS = {50: 10, 200: 5, 1000: 2}  # training-set size -> epochs: 40, 65 and 126 steps of 16
BATCH, SEED = 16, 0
SCRATCH_LR = 3e-4  # the from-scratch model's rate; full fine-tuning runs at SCRATCH_LR / 3
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}
IA3 = {"target_modules": ["key", "value", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]}


@dataclass(frozen=True)
class Contender:
    name: str
    strategy: Callable[[], train.Strategy]
    lr: float | None  # None: the strategy's default_lr
    pretrained: bool = True  # False: the same BertConfig, randomly initialised


CONTENDERS = [
    Contender("from scratch", lambda: train.FullFineTuning(SCRATCH_LR, ratio=1), None, pretrained=False),
    Contender("feature extraction", train.FeatureExtraction, 3e-2),
    Contender("LoRA r=8 (q, v)", lambda: train.AdapterTuning("lora", LORA), 3e-3),
    Contender("IA3 (k, v, ffn)", lambda: train.AdapterTuning("ia3", IA3), 1e-2),
    Contender("bottleneck (seq_bn, 24)", lambda: train.AdapterTuning("bottleneck", {}, max_rank=48), 3e-3),
    Contender("full fine-tuning", lambda: train.FullFineTuning(SCRATCH_LR, ratio=3), None),
    Contender("progressive unfreezing + discr. LR", lambda: train.ProgressiveUnfreezing(decay=2.6), 1e-3),
]
