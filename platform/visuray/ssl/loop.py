"""The per-worker DINO loop (:func:`train_loop_per_worker`) and its pieces.

Every worker decodes and multi-crops its shard's images (streamed by Ray Data), runs the student (a
DeepSpeed engine at the configured ZeRO stage) on all crops and the EMA teacher (a plain, full copy on
every worker) on the global crops, steps, updates the teacher and the centre, logs, reports and
checkpoints. Student and teacher start from the same ``model.backbone.weights`` (the bundled ImageNet
weights by default: domain-adaptive self-supervision on the catalog's own photos; null for random init).

Checkpoints (every ``train.checkpoint_every`` steps and at the end) hold the DeepSpeed engine state of
every rank (student weights, optimizer state, fp32 master weights; ZeRO shards per rank) plus, from rank
0, the teacher (safetensors), the centre and the step. The data stream restarts at an epoch boundary on
resume (Ray Data iterators hold no position), so a resumed run sees other batches than an uninterrupted
one would; the schedules continue from the step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch

from visuray.images import decode_image
from visuray.models.backbone import hold_batchnorm_statistics
from visuray.models.config import BackboneConfig
from visuray.models.weights import load_pretrained
from visuray.ssl.config import PretrainConfig, PretrainTrainSection, SSLModelSection
from visuray.ssl.dino import DINOLoss, update_teacher
from visuray.ssl.multicrop import MultiCropAugmentation
from visuray.train import common
from visuray.train.common import mean_across_ranks
from visuray.train.deepspeed_engine import (
    build_engine,
    engine_dtype,
    engine_param_groups,
    full_fp32_param,
    resolve_deepspeed_config,
    wants_bf16,
)
from visuray.train.scalars import ScalarLog
from visuray.train.validation import ValidationSet

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

CKPT_ENGINE_DIR = "engine"  # DeepSpeed's files (one subfolder, its tag)
CKPT_TEACHER = "teacher.safetensors"
CKPT_CENTER = "center.safetensors"
CKPT_STATE = "train_state.json"


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
    from visuray.train.schedules import cosine_schedule, teacher_temperature_schedule

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


def dino_step(
    engine: Any,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    crops: list[torch.Tensor],
    teacher_temp: float,
    momentum: float,
    autocast: contextlib.AbstractContextManager[Any],
    step: int,
) -> torch.Tensor:
    """One DINO step; returns its loss.

    The teacher sees the two global crops, the student (``engine``: a DeepSpeed engine, or anything with
    its ``__call__`` / ``backward`` / ``step`` / ``module``) all of them; the student steps, then the
    teacher moves towards it by ``momentum`` (EMA) and the loss moves the centre.
    """
    with torch.no_grad(), autocast:
        teacher_out = teacher([c.to(torch.float32) for c in crops[:2]])  # teacher: global crops only
    student_out = engine(crops)
    loss = loss_fn(student_out.float(), teacher_out.float(), teacher_temp)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"DINO loss is {loss.item()} at step {step}; lower train.lr or clip harder")
    engine.backward(loss)
    engine.step()
    update_teacher(engine.module.named_parameters(), teacher, momentum, full_fp32_param)
    return loss


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
    param_groups = engine_param_groups(engine)

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

        loss = dino_step(
            engine,
            teacher,
            loss_fn,
            crops,
            float(temp_schedule[step]),
            float(momentum_schedule[step]),
            autocast,
            step,
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

        save = common.is_due(step, tc.checkpoint_every, tc.steps)
        validate = validation is not None and common.is_due(step, cfg.validation.every, tc.steps)
        if not (save or validate or step % tc.log_every == 0):
            continue
        # Every rank reaches this point at the same steps: report() (and saving) are collective.
        last_loss, elapsed = mean_across_ranks(loss_sum / loss_count), time.monotonic() - started
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
            common.report_step(
                metrics,
                partial(
                    save_pretrain_checkpoint,
                    engine=engine,
                    teacher=teacher,
                    center=loss_fn.center,
                    state=saved,
                    rank=rank,
                ),
            )
        else:
            common.report_step(metrics)
        loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()

    scalars.close()
    return {"start_step": start_step, "steps": step, "final_loss": last_loss, "history": history}
