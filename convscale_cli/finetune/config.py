"""The fine-tuning run config: a frozen dataclass filled from a TOML file, CLI flags and ``--set`` overrides.

Defaults are the transfer recipe of Smith et al. (2023 §3) where the paper states it (SAM, stochastic
depth, dropout, optional repeated augmentation with multiplicity 4) and the NFNet 2021 JFT -> ImageNet recipe it builds
on where it does not (Brock et al. 2021 A.4-A.5: SAM rho 0.05 on 20% of the batch, stochastic depth 0.1, dropout
0.25, weight decay 1e-5, EMA 0.9999, batch 2048 at lr 0.1). ``None`` means "the model's recipe / spec default".

jax-free: the CLI builds the config before importing the engine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from convscale_cli.engine.config import RECIPE_FIELDS, check_duration, check_known, check_run_settings
from convscale_cli.errors import ConfigError
from convscale_cli.recipe import DEFAULT_EMA_DECAY, DEFAULT_SAM_FRACTION, DEFAULT_SAM_RHO

Precision = Literal["bf16", "fp32"]
LossName = Literal["softmax", "sigmoid"]

# NFNet 2021 A.5 fine-tunes at batch 2048 with lr 0.1 where pre-training used 1.6 at batch 4096: with the learning
# rate quoted at batch 4096 and scaled linearly (the engine's convention), that is 1/8 of the pre-training alpha.
DEFAULT_BATCH_SIZE = 2048
FINETUNE_LR_FRACTION = 1.0 / 8.0

_AUGMENT_FIELDS = frozenset({"crop", "min_area", "max_area", "aspect_ratio", "flip"})


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs. One duration (epochs, examples or steps) or a compute budget is required."""

    # --- what to fine-tune ----------------------------------------------------------------------------------------
    # ``--from``: a pre-training run directory (its newest checkpoint), one checkpoint directory inside it
    # (RUN/checkpoints/<step>), or an imported-weights directory (``convscale import-weights``).
    pretrained: str = ""
    dataset: str = ""  # registry name of the target dataset, e.g. "digits"
    out: str = ""  # run directory of the fine-tuning run
    model: str | None = None  # optional check: the architecture the checkpoint must hold
    # The from-scratch baseline: the checkpoint's architecture and build options with a random
    # initialisation instead of its weights; same recipe, data and compute, so the two top-1s compare directly.
    scratch: bool = False
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # DatasetSpec.open/info options
    num_classes: int | None = None  # size of the new classifier; default the dataset's

    # --- how long (one of these; with repeated augmentation they count augmented samples, so the compute of
    # ``--epochs 50 --repeat-aug 4`` equals that of ``--epochs 50`` in 1/4 of the passes: paper footnote 4) ----------
    epochs: float | None = None
    examples: int | None = None
    steps: int | None = None
    # Compute budget ("2-cpu-hours", "1e15-flops"), counted as in pre-training (model FLOPs, here with the SAM ascent
    # pass): it sets the duration when none is given, else the run stops cleanly with status "budget" once spent.
    budget: str | None = None

    # --- optimiser (the architecture's recipe with these overrides) ------------------------------------------------
    batch_size: int | None = None  # global batch; default DEFAULT_BATCH_SIZE (NFNet A.5)
    lr: float | None = None  # peak alpha at the recipe's base batch, scaled linearly; default recipe.lr / 8
    weight_decay: float = 1e-5  # NFNet A.5 fine-tuning (pre-training on JFT used 1e-6)
    loss: LossName | None = None  # default: the recipe's
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other Recipe field (warmup_fraction, ...)

    # --- the regularisers of the transfer recipe ---------------------------------------------------------------------
    sam_rho: float = DEFAULT_SAM_RHO  # SAM radius (Foret et al. 2021; NFNet A.5); 0 disables SAM
    sam_fraction: float = DEFAULT_SAM_FRACTION  # fraction of each batch the SAM ascent step uses (NFNet A.4: 20%)
    stochdepth_rate: float = 0.1  # NFNet A.5 transfer; linear in depth inside the model
    drop_rate: float = 0.25  # dropout before the classifier (NFNet A.5)
    ema_decay: float = DEFAULT_EMA_DECAY  # parameter EMA, warmed up as min(decay, (1+t)/(10+t)); 0 disables
    repeat_aug: int = 1  # repeated-augmentation multiplicity k (paper: 4 for its best 90.4% model)
    randaugment: tuple[int, float] = (0, 0.0)  # RandAugment (layers, magnitude); (0, 0) disables
    mixup: float = 0.0  # MixUp Beta(alpha, alpha); 0 disables
    cutmix: float = 0.0  # CutMix Beta(alpha, alpha); 0 disables (with both, half the batch gets each: NFNet A.3)
    label_smoothing: float = 0.0  # softmax targets mixed with the uniform distribution
    # crop/min_area/max_area/aspect_ratio/flip, over the dataset's defaults (DatasetSpec.augment: digits are not
    # flipped or cropped) over the recipe's inception crop + flip.
    augment: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- resolution (the paper trains at 384 and evaluates at 480: ConvNets run at any size, ViTs resample their
    # position embedding) --------------------------------------------------------------------------------------------
    resolution: int | None = None  # default: the model's training resolution
    eval_resolution: int | None = None  # default: the model's evaluation resolution
    # Evaluation resizes and keeps this central fraction of the image (0.875 = the NFNet 224/256 crop, A.3); 1.0 keeps
    # the whole image, for datasets whose object fills the frame (digits) and that are trained with crop="resize".
    # None: the dataset's choice (DatasetSpec.eval_crop), else 0.875.
    eval_crop_fraction: float | None = None
    # bf16 activations with fp32 params/optimiser/EMA, or fp32. None: the run's own when resuming, else fp32 on CPU
    # (bf16 is emulated there) and bf16 on accelerators (engine.resolve.default_precision).
    precision: Precision | None = None
    seed: int = 0  # new head, data order, augmentation, dropout

    # --- evaluation, checkpoints, logging (as in pre-training) --------------------------------------------------------
    eval_every: int = 0  # held-out eval of the raw parameters every N steps (0: only at the end, raw and EMA)
    eval_examples: int | None = None  # cap on held-out examples per eval
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 30.0
    keep: int = 3
    log_every: int = 50
    tensorboard: bool = True
    trackers: tuple[str, ...] | None = None  # as in pre-training: besides metrics.jsonl; None: tensorboard
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    force: bool = False

    # --- hardware and scale-out (as in pre-training) -----------------------------------------------------------------
    # Shard params and optimizer state over the data axis (ZeRO-3 style) instead of replicating: the paper's F7+
    # fine-tune at 384 px does not fit one accelerator.
    fsdp: bool = False
    worker_count: int = 0
    hardware: str | None = None
    peak_flops: float | None = None
    coordinator_address: str | None = None  # multi-host: "host:port" of process 0 (auto on TPU pods / SLURM)
    num_processes: int | None = None  # multi-host: number of processes
    process_id: int | None = None  # multi-host: this process's index

    def __post_init__(self) -> None:
        for key in ("pretrained", "dataset", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required (`{key}`)")
        check_duration(self)
        for key in (
            "batch_size",
            "lr",
            "resolution",
            "eval_resolution",
            "num_classes",
        ):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} = {value!r} must be > 0")
        if not (math.isfinite(self.sam_rho) and self.sam_rho >= 0):
            raise ConfigError(f"sam_rho = {self.sam_rho!r} must be >= 0 (0 disables SAM)")
        if not (math.isfinite(self.sam_fraction) and 0.0 < self.sam_fraction <= 1.0):
            raise ConfigError(f"sam_fraction = {self.sam_fraction!r} must be in (0, 1]")
        if self.repeat_aug < 1:
            raise ConfigError(f"repeat_aug = {self.repeat_aug!r} must be >= 1 (k augmented copies of each image)")
        crop = self.eval_crop_fraction
        if crop is not None and not (math.isfinite(crop) and 0.0 < crop <= 1.0):
            raise ConfigError(f"eval_crop_fraction = {self.eval_crop_fraction!r} must be in (0, 1]")
        for key in ("stochdepth_rate", "drop_rate", "label_smoothing"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} = {getattr(self, key)!r} must be in [0, 1)")
        for key, zero in (("weight_decay", "none"), ("mixup", "off"), ("cutmix", "off")):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):  # NaN-safe: NaN fails both tests
                raise ConfigError(f"{key} = {value!r} must be a finite number >= 0 (0: {zero})")
        layers, magnitude = self.randaugment
        if not (layers >= 0 and math.isfinite(magnitude) and magnitude >= 0):
            raise ConfigError(f"randaugment = {list(self.randaugment)!r} must be (layers >= 0, magnitude >= 0)")
        check_run_settings(self)
        check_known(self.recipe, RECIPE_FIELDS, "recipe")
        check_known(self.augment, _AUGMENT_FIELDS, "augment")


__all__ = ["DEFAULT_BATCH_SIZE", "FINETUNE_LR_FRACTION", "FinetuneConfig"]
