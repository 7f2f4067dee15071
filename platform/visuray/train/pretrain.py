"""Self-supervised DINO pretraining of a timm backbone on Ray Train with DeepSpeed ZeRO.

The driver (:func:`run_pretrain`) streams the catalog's images through Ray Data into a ``TorchTrainer``
whose workers run :func:`train_loop_per_worker`: decode and multi-crop their shard's images, run the
student (a DeepSpeed engine at the configured ZeRO stage) on all crops and the EMA teacher (a plain,
full copy on every worker) on the global crops, step, update the teacher and the centre, log, report and
checkpoint. Student and teacher start from the same ``model.backbone.weights`` (the bundled ImageNet
weights by default: domain-adaptive self-supervision on the catalog's own photos; null for random init). After ``fit()`` the teacher's backbone (DINO evaluates the teacher) is published as a model
artifact that ``visuray.models.embedding.load_embedding_model`` and ``model.backbone.weights`` read: an embedding
model whose projection is the identity (``embedding_dim`` = the backbone's width, zero bias), so its
embedding is the L2-normalised pooled teacher feature that DINO's k-NN evaluation uses.

Checkpoints (every ``train.checkpoint_every`` steps and at the end) hold the DeepSpeed engine state of
every rank (student weights, optimizer state, fp32 master weights; ZeRO shards per rank) plus, from rank
0, the teacher (safetensors), the centre and the step. A worker failure restarts the worker group from the
latest checkpoint (``scaling.max_failures``); running the job again with the same ``name`` and ``run_dir``
continues that run. Resuming needs the same number of workers and ZeRO stage (ZeRO shards are per rank).
The data stream restarts at an epoch boundary on resume (Ray Data iterators hold no position), so a
resumed run sees other batches than an uninterrupted one would; the schedules continue from the step.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from visuray.config import StrictModel
from visuray.models.config import BackboneConfig
from visuray.storage import StorageOptions, absolute_uri, is_remote
from visuray.train import common
from visuray.train.deepspeed_engine import DeepSpeedSection
from visuray.train.validation import ValidationSection, validation_metric_names

if TYPE_CHECKING:
    import ray.train
    import torch
    from torch import nn

log = logging.getLogger(__name__)

CKPT_ENGINE_DIR = "engine"  # DeepSpeed's files (one subfolder, its tag)
CKPT_TEACHER = "teacher.safetensors"
CKPT_CENTER = "center.safetensors"
CKPT_STATE = "train_state.json"


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


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


class PretrainConfig(StrictModel):
    """The ``pretrain`` job: catalog (labels unused) in, model artifact (teacher backbone) out."""

    job: Literal["pretrain"] = "pretrain"
    name: str = common.run_name_field("pretrain")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    catalog: str = Field(..., description="URI of a published catalog (only its images are read)")
    output: str = Field(..., description="URI of the model artifact to publish a new version into")
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


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------


def create_ssl_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone of :func:`visuray.models.backbone.create_backbone`, made to accept the local crops'
    smaller size: fixed-size architectures (ViTs) get ``dynamic_img_size=True`` (position embeddings
    interpolated per input). Only the forward changes, so the weights load into ``create_backbone(cfg)``."""
    import timm
    import timm.models

    from visuray.models.backbone import backbone_kwargs, create_backbone

    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
    if pretrained_cfg is None or not getattr(pretrained_cfg, "fixed_input_size", False):
        return create_backbone(cfg)  # CNNs take any size
    return timm.create_model(
        cfg.name, pretrained=False, num_classes=0, dynamic_img_size=True, **backbone_kwargs(cfg)
    )


def build_dino_model(model_cfg: SSLModelSection, drop_path_rate: float | None = None) -> nn.Module:
    """A :class:`visuray.ssl.dino.MultiCropWrapper` (backbone + DINO head) from random init."""
    from visuray.ssl.dino import MultiCropWrapper
    from visuray.ssl.heads import build_dino_head

    backbone_cfg = model_cfg.backbone
    if drop_path_rate is not None:
        backbone_cfg = backbone_cfg.model_copy(update={"drop_path_rate": drop_path_rate})
    backbone = create_ssl_backbone(backbone_cfg)
    head = build_dino_head(
        int(backbone.num_features),
        model_cfg.out_dim,
        model_cfg.hidden_dim,
        model_cfg.bottleneck_dim,
        model_cfg.nlayers,
        model_cfg.use_bn,
        model_cfg.norm_last_layer,
    )
    return MultiCropWrapper(backbone, head)


def build_teacher(student: nn.Module, model_cfg: SSLModelSection) -> nn.Module:
    """The teacher: the student's architecture without stochastic depth (DINO), its weights, no grads.

    It stays in train mode as in DINO (a CNN's BatchNorm normalises with batch statistics, not with
    running averages that the EMA never updates), unless ``model.backbone.batchnorm_statistics`` holds the
    starting weights' statistics (pretrained starts), which student and teacher then both use; ViTs have no
    mode-dependent layers at drop_path 0.
    """
    teacher = build_dino_model(model_cfg, drop_path_rate=0.0)
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def dino_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only (not biases, norms, tokens), and the head's last layer in
    groups of its own, marked ``last_layer``, so that its learning rate can be 0 while it is frozen.

    Freezing by a zero learning rate (rather than DINO's dropping of the gradient) works the same under
    every ZeRO stage, where gradients live in DeepSpeed's partitioned buffers; AdamW's decoupled decay is
    scaled by the learning rate too, so the weights stay exactly as initialised. Adam's moment estimates
    do see the frozen steps' gradients, which DINO's version skips.
    """
    from visuray.ssl.heads import is_last_layer_parameter

    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (is_last_layer_parameter(name), param.ndim >= 2)
            groups.setdefault(key, []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "last_layer": last, "decay": decay}
        for (last, decay), params in sorted(groups.items())
    ]


def dino_schedules(tc: PretrainTrainSection, world_size: int) -> tuple[Any, Any, Any, Any]:
    """Per-step learning rate (peak ``lr`` x global batch / 256, as DINO scales it; warm-up, then cosine),
    weight decay, teacher momentum and teacher temperature, indexed by step."""
    from visuray.ssl.schedules import cosine_schedule, teacher_temperature_schedule

    peak_lr = tc.lr * tc.batch_size_per_worker * world_size / 256
    return (
        cosine_schedule(peak_lr, tc.min_lr, tc.steps, tc.warmup_steps),
        cosine_schedule(tc.weight_decay, tc.weight_decay_end, tc.steps),
        cosine_schedule(tc.momentum_teacher, 1.0, tc.steps),
        teacher_temperature_schedule(
            tc.warmup_teacher_temp, tc.teacher_temp, tc.warmup_teacher_temp_steps, tc.steps
        ),
    )


def set_step_hyperparameters(
    param_groups: list[dict[str, Any]], lr: float, weight_decay: float, freeze_last_layer: bool
) -> None:
    for group in param_groups:
        group["lr"] = 0.0 if freeze_last_layer and group.get("last_layer") else lr
        if group.get("decay"):
            group["weight_decay"] = weight_decay


def stream_image_batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int) -> Any:
    """Endless batches of encoded image bytes from a Ray Data shard, epoch after epoch."""
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,  # equal batch counts on every worker, so collectives stay in step
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=(seed + epoch) if shuffle_buffer else None,
        ):
            count += 1
            yield batch["image"]
        if count == 0:
            raise RuntimeError(
                f"the data shard holds fewer than batch_size={batch_size} images: lower "
                "train.batch_size_per_worker or scaling.num_workers"
            )
        epoch += 1


def augmentation_seed(seed: int, rank: int, step: int) -> int:
    """Crops differ across ranks and steps but repeat when the same step is run again."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def write_heartbeat(directory: str, rank: int, record: dict[str, Any]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path / f"rank-{rank}.json")  # readers never see half a file


def save_pretrain_checkpoint(
    directory: str, engine: Any, teacher: nn.Module, center: torch.Tensor, state: dict[str, Any], rank: int
) -> None:
    """Every rank writes its DeepSpeed shards; rank 0 also the teacher, the centre and the step."""
    from safetensors.torch import save_file

    from visuray.checkpoint import state_dict_bytes
    from visuray.train.deepspeed_engine import save_engine_checkpoint

    save_engine_checkpoint(engine, Path(directory, CKPT_ENGINE_DIR))
    if rank == 0:
        Path(directory, CKPT_TEACHER).write_bytes(state_dict_bytes(teacher))
        save_file({"center": center.detach().cpu().contiguous()}, os.path.join(directory, CKPT_CENTER))
        Path(directory, CKPT_STATE).write_text(json.dumps(state))


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    return json.loads(Path(directory, CKPT_STATE).read_text())


def load_teacher_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    from visuray.checkpoint import tensors_from_bytes

    return tensors_from_bytes(Path(directory, CKPT_TEACHER).read_bytes())


def restore_pretrain_checkpoint(
    checkpoint: ray.train.Checkpoint,
    engine: Any,
    teacher: nn.Module,
    loss_fn: nn.Module,
    world_size: int,
    zero_stage: int,
) -> dict[str, Any]:
    """Load engine (student + optimizer), teacher and centre; return the saved state (step, loss, ...)."""
    from safetensors.torch import load_file

    from visuray.checkpoint import load_state_dict_strict
    from visuray.train.deepspeed_engine import load_engine_checkpoint

    with checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
        if state["world_size"] != world_size or state["zero_stage"] != zero_stage:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by {state['world_size']} worker(s) at ZeRO stage "
                f"{state['zero_stage']}; this run has {world_size} at stage {zero_stage}. Resume with the "
                "same scaling.num_workers and deepspeed.zero_stage (ZeRO shards are per rank)"
            )
        load_engine_checkpoint(engine, Path(directory, CKPT_ENGINE_DIR))
        load_state_dict_strict(teacher, load_teacher_tensors(directory), f"teacher of {checkpoint.path}")
        center = load_file(os.path.join(directory, CKPT_CENTER))["center"]
        loss_fn.center.copy_(center.to(loss_fn.center.device))
    return state


# ----------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker; returns (from rank 0, kept as ``Result.return_value``) the run's summary."""
    import contextlib

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from visuray.images import decode_image
    from visuray.models.backbone import hold_batchnorm_statistics
    from visuray.models.weights import load_pretrained
    from visuray.ssl.dino import DINOLoss, update_teacher
    from visuray.ssl.multicrop import MultiCropAugmentation
    from visuray.train.common import mean_across_ranks
    from visuray.train.deepspeed_engine import (
        build_engine,
        engine_dtype,
        full_fp32_param,
        optimizer_param_groups,
        resolve_deepspeed_config,
        wants_bf16,
    )
    from visuray.train.scalars import ScalarLog
    from visuray.train.validation import ValidationSet

    cfg = PretrainConfig.model_validate(config["job"])
    tc, mc = cfg.train, cfg.model
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # the same initial weights on every rank

    # ---------------- model, teacher, engine ----------------
    student = build_dino_model(mc)
    # Student and teacher start from the same pretrained weights (domain-adaptive DINO); a resumed run
    # replaces them with its checkpoint's below.
    load_pretrained(student.backbone, mc.backbone, cfg.storage)
    teacher = build_teacher(student, mc).to(device)
    for model in (student, teacher):  # both normalise alike: pretrained statistics held, or batch ones
        hold_batchnorm_statistics(model.backbone, mc.backbone)
    optimizer = torch.optim.AdamW(dino_param_groups(student, tc.weight_decay), lr=tc.lr)
    bf16 = wants_bf16(cfg.deepspeed.precision)
    ds_config = resolve_deepspeed_config(config["deepspeed"], tc.batch_size_per_worker, tc.clip_grad, bf16)
    engine = build_engine(student, optimizer, ds_config)
    loss_fn = DINOLoss(mc.out_dim, 2 + cfg.crops.num_local, tc.student_temp, tc.center_momentum).to(device)
    input_dtype = engine_dtype(engine)
    param_groups = optimizer_param_groups(engine)

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"step": 0, "loss": None}
    if checkpoint is not None:
        state = restore_pretrain_checkpoint(
            checkpoint, engine, teacher, loss_fn, world_size, cfg.deepspeed.zero_stage
        )

    # ---------------- schedules (per step, precomputed) ----------------
    global_batch = tc.batch_size_per_worker * world_size
    lr_schedule, wd_schedule, momentum_schedule, temp_schedule = dino_schedules(tc, world_size)

    validation = None
    if cfg.validation.catalog is not None:
        validation = ValidationSet.load(cfg.validation, cfg.storage, mc.backbone.input_spec)

    def teacher_features(batch: torch.Tensor) -> torch.Tensor:
        # What the published model embeds: the teacher backbone's pooled features, unit length.
        return torch.nn.functional.normalize(
            teacher.backbone(batch.to(device, dtype=input_dtype)).float(), dim=-1
        )

    # ---------------- data ----------------
    spec = mc.backbone.input_spec
    augment = MultiCropAugmentation(
        spec.img_size,
        cfg.crops.local_size,
        cfg.crops.num_local,
        cfg.crops.global_scale,
        cfg.crops.local_scale,
        spec.mean,
        spec.std,
    )
    batches = stream_image_batches(
        ray.train.get_dataset_shard("train"),
        tc.batch_size_per_worker,
        tc.shuffle_buffer,
        tc.seed + state["step"],
    )
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    start_step = step = int(state["step"])
    node_id = ray.get_runtime_context().get_node_id()
    last_loss = state.get("loss")
    if rank == 0:
        origin = f"resuming at step {start_step}" if checkpoint else "starting at step 0"
        print(
            f"[pretrain] {origin} of {tc.steps}; {world_size} worker(s) on {device}, ZeRO-{cfg.deepspeed.zero_stage}, "
            f"{'bf16' if bf16 else 'fp32'}, global batch {global_batch} x {augment.num_crops} crops",
            flush=True,
        )

    # ---------------- loop ----------------
    history: list[dict[str, float]] = []
    scalars = ScalarLog(config.get("tensorboard_dir") if rank == 0 else None)
    loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()
    engine.train()
    while step < tc.steps:
        images = [decode_image(bytes(data)) for data in next(batches)]
        torch.manual_seed(augmentation_seed(tc.seed, rank, step))
        crops = [c.to(device, input_dtype, non_blocking=True) for c in augment.batch(images)]
        set_step_hyperparameters(
            param_groups,
            float(lr_schedule[step]),
            float(wd_schedule[step]),
            step < tc.freeze_last_layer_steps,
        )

        with torch.no_grad(), autocast:
            teacher_out = teacher([c.to(torch.float32) for c in crops[:2]])  # teacher: global crops only
        student_out = engine(crops)
        loss = loss_fn(student_out.float(), teacher_out.float(), float(temp_schedule[step]))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"DINO loss is {loss.item()} at step {step}; lower train.lr or clip harder"
            )
        engine.backward(loss)
        engine.step()
        update_teacher(
            engine.module.named_parameters(), teacher, float(momentum_schedule[step]), full_fp32_param
        )
        step += 1
        loss_sum += loss.detach()
        loss_count += 1
        if tc.heartbeat_dir:
            write_heartbeat(
                tc.heartbeat_dir,
                rank,
                {
                    "rank": rank,
                    "pid": os.getpid(),
                    "node_id": node_id,
                    "step": step,
                    "start_step": start_step,
                },
            )

        save = step % tc.checkpoint_every == 0 or step == tc.steps
        validate = validation is not None and (step % cfg.validation.every == 0 or step == tc.steps)
        if not (save or validate or step % tc.log_every == 0):
            continue
        # Every rank reaches this point at the same steps: report() (and saving) are collective.
        last_loss = mean_across_ranks(loss_sum / loss_count)
        elapsed = time.monotonic() - started
        metrics = {
            "step": step,
            "start_step": start_step,
            "train/loss": last_loss,
            "train/lr": float(lr_schedule[step - 1]),
            "train/weight_decay": float(wd_schedule[step - 1]),
            "train/teacher_momentum": float(momentum_schedule[step - 1]),
            "train/teacher_temp": float(temp_schedule[step - 1]),
            "train/center_norm": float(loss_fn.center.norm()),
            "train/images_per_s": loss_count * global_batch / max(elapsed, 1e-9),
        }
        if validate:
            assert validation is not None
            was_training = teacher.training
            teacher.eval()  # BatchNorm backbones: use, never update, the running statistics
            metrics |= validation.evaluate(teacher_features, rank, world_size) or {}
            teacher.train(was_training)
        history.append(common.history_entry(metrics))
        scalars.scalars(metrics, step)
        if rank == 0:
            print(
                f"[pretrain] step {step}/{tc.steps} loss {last_loss:.4f} lr {metrics['train/lr']:.2e} "
                f"T_t {metrics['train/teacher_temp']:.3f} m {metrics['train/teacher_momentum']:.5f} "
                f"{metrics['train/images_per_s']:.1f} img/s" + (" (checkpoint)" if save else ""),
                flush=True,
            )
        if save:
            saved = {
                "step": step,
                "loss": last_loss,
                "world_size": world_size,
                "zero_stage": cfg.deepspeed.zero_stage,
            }
            with tempfile.TemporaryDirectory() as directory:
                save_pretrain_checkpoint(directory, engine, teacher, loss_fn.center, saved, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()

    scalars.close()
    return {"start_step": start_step, "steps": step, "final_loss": last_loss, "history": history}


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------


def tensorboard_dir(cfg: PretrainConfig) -> str | None:
    """Where rank 0 writes TensorBoard events: ``<run_dir>/<name>/tensorboard`` for a local run_dir,
    resolved on the driver (workers have another working directory); None when off or remote."""
    if not cfg.train.tensorboard or is_remote(cfg.run_dir):
        return None
    return os.path.join(absolute_uri(cfg.run_dir), cfg.name, "tensorboard")


def build_trainer(cfg: PretrainConfig) -> Any:
    from visuray.catalog.readers import read_catalog_dataset
    from visuray.train.deepspeed_engine import load_deepspeed_config
    from visuray.train.ray_job import build_torch_trainer

    ds_base = load_deepspeed_config(cfg.deepspeed.zero_stage, cfg.deepspeed.config)
    dataset = read_catalog_dataset(absolute_uri(cfg.catalog), cfg.storage, columns=["image"])
    loop_config = {
        "job": cfg.model_dump(mode="json"),
        "deepspeed": ds_base,
        "tensorboard_dir": tensorboard_dir(cfg),
    }
    return build_torch_trainer(
        train_loop_per_worker,
        loop_config,
        cfg,
        extra_resources=cfg.scaling.resources_per_worker,
        datasets={"train": dataset},
    )


def export_teacher_backbone(
    teacher_tensors: dict[str, torch.Tensor], cfg: PretrainConfig, metadata: dict[str, Any]
) -> Any:
    """Publish the teacher's backbone as an embedding model with an identity projection (see the module
    docstring); returns the artifact."""
    from visuray.checkpoint import load_state_dict_strict
    from visuray.models.embedding import BACKBONE_PREFIX, pooled_feature_model, save_model

    model, model_cfg = pooled_feature_model(cfg.model.backbone.model_copy(update={"drop_path_rate": 0.0}))
    backbone = {
        k[len(BACKBONE_PREFIX) :]: v for k, v in teacher_tensors.items() if k.startswith(BACKBONE_PREFIX)
    }
    load_state_dict_strict(model.backbone, backbone, "the pretraining teacher's backbone")
    batchnorm = recalibrate_batchnorm(model.backbone, cfg)
    return save_model(
        cfg.output, model, model_cfg, job_cfg=cfg,
        metadata={**metadata, "projection_init": "identity", "batchnorm_statistics": batchnorm},
        options=cfg.storage,
    )  # fmt: skip


def recalibrate_batchnorm(backbone: nn.Module, cfg: PretrainConfig) -> str | None:
    """Recompute ``backbone``'s BatchNorm statistics on ``cfg.export.batchnorm_images`` clean catalog
    images (see :class:`PretrainExportSection`); returns what its statistics now are, for the artifact's
    metadata (None for a backbone without BatchNorm)."""
    from visuray.catalog.readers import sample_catalog_images
    from visuray.images import encoded_image_batches
    from visuray.models.batchnorm import batchnorm_layers, reestimate_batchnorm

    if not batchnorm_layers(backbone):
        return None
    if cfg.model.backbone.freezes_batchnorm:
        return "the starting weights' (held fixed while training: model.backbone.batchnorm_statistics)"
    if cfg.export.batchnorm_images == 0:
        return "the teacher's running averages over augmented training crops"
    images = sample_catalog_images(
        absolute_uri(cfg.catalog), cfg.export.batchnorm_images, cfg.storage, seed=cfg.train.seed
    )
    log.info("re-estimating BatchNorm statistics on %d catalog images", len(images))
    seen = reestimate_batchnorm(backbone, encoded_image_batches(images, cfg.model.backbone.input_spec))
    return f"re-estimated on {seen} catalog images (serving preprocessing)"


def with_checked_weights(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with the backbone's starting weights checked and their preprocessing recorded
    (:func:`visuray.models.weights.check_pretrained`), before any worker starts."""
    from visuray.models.weights import check_pretrained

    backbone = check_pretrained(cfg.model.backbone, cfg.storage)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": backbone})})


def precheck(cfg: PretrainConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage)


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain on Ray Train, publish the teacher's backbone as a model artifact, return the summary."""
    from visuray.cluster import ensure_ray
    from visuray.train.ray_job import fit_checkpointed

    ensure_ray()
    cfg = with_checked_weights(cfg)
    log.info("pretrain %r: %d steps on %s -> %s", cfg.name, cfg.train.steps, cfg.catalog, cfg.output)
    result, summary = fit_checkpointed(build_trainer(cfg), "pretrain", cfg.name)
    with result.checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
        teacher = load_teacher_tensors(directory)
    artifact = export_teacher_backbone(
        teacher,
        cfg,
        {
            "trained_by": "pretrain",
            "ssl_method": "dino",
            "train_steps": state["step"],
            "final_loss": state.get("loss"),
            "catalog": cfg.catalog,
            "zero_stage": cfg.deepspeed.zero_stage,
        },
    )
    log.info("published model %s (version %s)", artifact.uri, artifact.manifest.version)
    return {
        "output": artifact.uri,
        "model_version": artifact.manifest.version,
        "steps": state["step"],
        "start_step": summary.get("start_step"),
        "final_loss": state.get("loss"),
        "history": summary.get("history", []),
        "run_path": result.path,
        "checkpoint": result.checkpoint.path,
        "tensorboard_dir": tensorboard_dir(cfg),
    }


def reported_metrics(cfg: PretrainConfig) -> set[str]:
    """What every report of the loop carries (a sweep ranks trials by one of them)."""
    return {
        "train/loss",
        "train/lr",
        "train/weight_decay",
        "train/teacher_momentum",
        "train/teacher_temp",
        "train/center_norm",
        "train/images_per_s",
    } | validation_metric_names(cfg.validation)
