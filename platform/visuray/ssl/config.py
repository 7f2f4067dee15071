"""The ``pretrain`` job's config: DINO's model (backbone and head), multi-crop, optimisation and DINO
hyperparameters, validation, DeepSpeed, scaling and export. Pydantic only, no torch: the CLI and job specs
import it. Every default is DINO's unless its description says why not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from visuray.config import StrictModel
from visuray.models.config import BackboneConfig
from visuray.train import common
from visuray.train.deepspeed_engine import DeepSpeedSection
from visuray.train.validation import ValidationSection

if TYPE_CHECKING:
    pass


class SSLModelSection(StrictModel):
    """Backbone and DINO head."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    out_dim: int = Field(
        8192,
        ge=2,
        description="K, the number of prototypes the head scores; DINO uses 65536 on ImageNet. Catalogs are "
        "10-100x smaller and DINO's ablation loses little at a few thousand, at 8x less head memory",
    )
    hidden_dim: int = Field(2048, ge=1, description="MLP width of the head (DINO's value)")
    bottleneck_dim: int = Field(
        256, ge=1, description="L2-normalised bottleneck before the last layer (DINO)"
    )
    nlayers: int = Field(3, ge=1, description="head depth; DINO's 3 layers beat 1 or 2 in its ablation")
    use_bn: bool = Field(False, description="BatchNorm in the head; off for ViTs (DINO), on can help CNNs")
    norm_last_layer: bool = Field(
        True,
        description="fix the last layer's row norms at 1; stabilises ViT training (DINO). False learns the "
        "norms: sometimes better, less stable",
    )


class CropsSection(StrictModel):
    """Multi-crop: 2 global crops at ``model.backbone.img_size`` plus ``num_local`` small local crops."""

    num_local: int = Field(
        8, ge=0, description="local crops per image; DINO's 2x224 + 8x96 is its best cost/accuracy point"
    )
    local_size: int = Field(
        32,
        gt=0,
        description="local crop side; DINO uses 96 at 224 (0.43x); 32 at the default 64 px. For ViTs a "
        "multiple of the patch size",
    )
    global_scale: tuple[float, float] = Field(
        (0.4, 1.0), description="area range of global crops (DINO: 0.4-1; 0.14-1 helps with fewer locals)"
    )
    local_scale: tuple[float, float] = Field(
        (0.05, 0.4), description="area range of local crops; its top meets the global range's bottom (DINO)"
    )


class PretrainTrainSection(common.TrainLoopSection):
    """Optimisation, DINO hyperparameters and bookkeeping; DINO's defaults unless said otherwise."""

    steps: int = common.total_steps_field(1000)
    batch_size_per_worker: int = Field(
        64, ge=2, description="images per worker per step (DINO: 64 per GPU); each gives 2 + num_local crops"
    )
    lr: float = Field(
        5e-4,
        gt=0,
        description="learning rate for a global batch of 256; the peak is lr * global_batch / 256 (DINO's "
        "linear scaling rule)",
    )
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine learning-rate decay (DINO)")
    warmup_steps: int = Field(
        100, ge=0, description="linear lr warm-up (DINO: 10 epochs); ViTs diverge at full lr from step 0"
    )
    weight_decay: float = Field(
        0.04, ge=0, description="start of the cosine weight-decay schedule (DINO: 0.04 -> 0.4 for ViTs)"
    )
    weight_decay_end: float = Field(
        0.4, ge=0, description="end of the weight-decay schedule; rising decay helps ViTs late in training"
    )
    momentum_teacher: float = Field(
        0.996,
        ge=0,
        lt=1,
        description="teacher EMA momentum at step 0, raised to 1 along a cosine; 0.996 suits batch 256, "
        "raise it (0.9995) for small batches",
    )
    warmup_teacher_temp: float = Field(
        0.04,
        gt=0,
        description="teacher temperature at step 0; 0.04 works well, lower it if the loss stays flat",
    )
    teacher_temp: float = Field(
        0.07,
        gt=0,
        description="teacher temperature after the warm-up; DINO's 0.07 for long runs (above 0.07 collapses)",
    )
    warmup_teacher_temp_steps: int = Field(
        300, ge=0, description="linear teacher-temperature warm-up (DINO: 30 epochs, a tenth of training)"
    )
    student_temp: float = Field(0.1, gt=0, description="student softmax temperature (DINO)")
    center_momentum: float = Field(
        0.9, ge=0, lt=1, description="EMA momentum of the centre (DINO); lower reacts faster, noisier"
    )
    clip_grad: float | None = Field(
        3.0, gt=0, description="global gradient-norm clip (DINO: 3.0); None turns it off"
    )
    freeze_last_layer_steps: int = Field(
        100,
        ge=0,
        description="steps (not epochs: a stream has none) during which the head's last layer keeps its "
        "initial weights; DINO freezes it for the first epoch because it destabilises early training",
    )
    checkpoint_every: int = common.checkpoint_every_field()
    keep_checkpoints: int = common.keep_checkpoints_field()
    log_every: int = common.log_every_field()
    shuffle_buffer: int = Field(
        256, ge=0, description="rows in each worker's local shuffle buffer; 0 streams in catalog order"
    )
    seed: int = Field(0, description="initialisation, augmentation and shuffle seed")
    tensorboard: bool = Field(
        True,
        description="rank 0 writes the logged train/* scalars as TensorBoard events into "
        "<run_dir>/<name>/tensorboard (local run_dir only: TensorBoard's writer needs a local folder)",
    )
    heartbeat_dir: str | None = Field(
        None,
        description="local folder where each worker writes rank-<r>.json (pid, node, step) after every step, "
        "for watching a run from outside (and the failure-injection tests); None writes nothing",
    )


class PretrainScalingSection(common.ScalingSection):
    """How many Ray Train workers, on what."""

    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs per worker; each decodes and crops its own images, so give it several"
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="extra custom resources per worker (e.g. {train_slot: 1} with one slot per node to "
        "place one worker per node)",
    )


class PretrainExportSection(StrictModel):
    """What is done to the teacher's backbone before it is published."""

    batchnorm_images: int = Field(
        2048,
        ge=0,
        description="catalog images (a seeded random sample, serving preprocessing) over which a backbone "
        "with BatchNorm gets its running statistics recomputed before publishing; the teacher's own are "
        "averages over augmented crops. 0 publishes the teacher's. No effect on models without BatchNorm, "
        "nor when model.backbone.batchnorm_statistics holds the starting weights' fixed (pretrained starts: "
        "re-estimating ImageNet statistics on the 300 demo photos cut their leave-one-out Recall@1 0.63 -> 0.46)",
    )


class PretrainConfig(common.TrainingJobConfig):
    """The ``pretrain`` job: a catalog (only its images are read) in, model artifact (teacher backbone) out."""

    job: Literal["pretrain"] = "pretrain"
    name: str = common.run_name_field("pretrain")
    run_dir: str = common.run_dir_field("./runs/pretrain")
    model: SSLModelSection = Field(default_factory=SSLModelSection)
    crops: CropsSection = Field(default_factory=CropsSection)
    train: PretrainTrainSection = Field(default_factory=PretrainTrainSection)
    validation: ValidationSection = Field(
        default_factory=ValidationSection,
        description="retrieval with the teacher's pooled features on a labelled catalog during training",
    )
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    scaling: PretrainScalingSection = Field(default_factory=PretrainScalingSection)
    export: PretrainExportSection = Field(default_factory=PretrainExportSection)

    @model_validator(mode="after")
    def _crops_fit_patches(self) -> PretrainConfig:
        patch = self.model.backbone.patch_size
        if patch is not None:
            for what, size in (("model.backbone.img_size", self.model.backbone.img_size),
                               ("crops.local_size", self.crops.local_size)):  # fmt: skip
                if size % patch:
                    raise ValueError(f"{what} ({size}) must be a multiple of the patch size ({patch})")
        return self
