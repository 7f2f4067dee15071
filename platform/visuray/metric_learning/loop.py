"""The per-worker fine-tuning loop (:func:`train_loop_per_worker`) and its pieces: the loss builder,
parameter groups with layer-wise learning rates, and the DeepSpeed checkpoints of a run.

Every worker reads the catalog (and, for the adaptive triplet loss, derives fine-grained classes from its
titles), builds the model from its starting weights (``model.backbone.weights``, or ``init_from``),
optionally freezes its first blocks, wraps it in a DeepSpeed engine at ``deepspeed.zero_stage`` (fp32 over
gloo on CPU, bf16 on GPU), restores the latest Ray Train checkpoint if the run has one, then steps, logs,
reports and checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from visuray.catalog.torch_dataset import CatalogTorchDataset
from visuray.metric_learning.config import FinetuneConfig, LossSection
from visuray.metric_learning.data import build_sampler, endless_batches, train_transform, training_labels
from visuray.models.embedding import build_embedding_model
from visuray.models.weights import prepare_for_training, starting_point
from visuray.train import common
from visuray.train.common import CKPT_STATE, CKPT_WEIGHTS, mean_across_ranks
from visuray.train.deepspeed_engine import (
    build_engine,
    engine_dtype,
    engine_param_groups,
    resolve_deepspeed_config,
    wants_bf16,
)
from visuray.train.schedules import lr_schedule
from visuray.train.validation import ValidationSet

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# Files of one Ray Train checkpoint (a directory): the consolidated weights (CKPT_WEIGHTS) and the state
# (CKPT_STATE) as in the other jobs' checkpoints (visuray.train.common: load_train_checkpoint reads them), and
CKPT_ENGINE_DIR = "engine"  # DeepSpeed's files: every rank's shards of module and optimizer state


def build_loss(cfg: LossSection, semantic_distances: Any = None) -> nn.Module:
    """The metric loss named by ``cfg`` (``semantic_distances``: the fine classes' (C, C), for ATL)."""
    from visuray.metric_learning.losses import (
        AdaptiveTripletLoss,
        ContrastiveLoss,
        MultiSimilarityLoss,
        TripletMarginLoss,
    )
    from visuray.metric_learning.losses.mining import build_miner

    # Batch-all is averaged over active triplets: most of its triplets are satisfied and would dilute it.
    reduction = "active" if cfg.miner == "batch_all" else "mean"
    if cfg.name == "triplet":
        return TripletMarginLoss(cfg.margin, cfg.distance, build_miner(cfg.miner), reduction)
    if cfg.name == "adaptive_triplet":
        if semantic_distances is None:
            raise ValueError("adaptive_triplet needs the semantic distances of the weak fine-grained classes")
        return AdaptiveTripletLoss(
            semantic_distances, cfg.margin, cfg.margin_scale, cfg.distance, build_miner(cfg.miner), reduction
        )
    if cfg.name == "multi_similarity":
        return MultiSimilarityLoss(cfg.ms_alpha, cfg.ms_beta, cfg.ms_base)
    return ContrastiveLoss(cfg.pos_margin, cfg.neg_margin, cfg.distance)


def model_depths(model: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of every parameter of the embedding model and the backbone's number of block groups B:
    the backbone's own (:func:`visuray.models.backbone.parameter_depths`: 0 stem, 1..B blocks, B + 1
    final layers), and B + 1 for the projection."""
    from visuray.models.backbone import parameter_depths

    depths, num_blocks = parameter_depths(model.backbone)
    out = {name: num_blocks + 1 for name, _ in model.named_parameters()}
    out.update({"backbone." + name: depth for name, depth in depths.items()})
    return out, num_blocks


@dataclass
class ParamGroupInfo:
    """Per optimizer group: its learning-rate multiplier and whether it belongs to the backbone."""

    lr_scale: float
    backbone: bool


def finetune_param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None
) -> tuple[list[dict[str, Any]], list[ParamGroupInfo]]:
    """AdamW groups: decay on matrices only (as :func:`visuray.train.common.decay_param_groups`), split by depth when
    ``layer_decay`` is set. Frozen parameters are left out. The info list is parallel to the groups
    (kept beside them: optimizer wrappers need not preserve extra keys in their groups)."""
    if layer_decay is None:
        groups = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = (name.startswith("backbone."), param.ndim >= 2)
                groups.setdefault(key, []).append(param)
        items = [((bb, dec), 1.0, params) for (bb, dec), params in sorted(groups.items())]
    else:
        depth_of, num_blocks = model_depths(model)
        groups = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = (name.startswith("backbone."), param.ndim >= 2, depth_of[name])
                groups.setdefault(key, []).append(param)
        items = [
            ((bb, dec), layer_decay ** (num_blocks + 1 - depth), params)
            for (bb, dec, depth), params in sorted(groups.items())
        ]
    param_groups, info = [], []
    for (backbone, decay), scale, params in items:
        param_groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0})
        info.append(ParamGroupInfo(scale, backbone))
    return param_groups, info


def set_learning_rates(
    param_groups: list[dict[str, Any]], info: list[ParamGroupInfo], lr: float, backbone_frozen: bool
) -> None:
    """Each group's lr for this step; a frozen backbone gets 0 (AdamW then leaves it exactly as is)."""
    for group, meta in zip(param_groups, info, strict=True):
        group["lr"] = 0.0 if (backbone_frozen and meta.backbone) else lr * meta.lr_scale


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The module's complete fp32 state dict at any ZeRO stage and precision (a collective: every rank
    calls it). Frozen parameters under ZeRO-3 have no master copy and keep their module value."""
    from visuray.train.deepspeed_engine import full_fp32_param

    module = engine.module
    tensors = {}
    for name, param in module.named_parameters():
        value = full_fp32_param(param)
        tensors[name] = (value if value is not None else param.detach().float()).cpu().contiguous().clone()
    for name, buffer in module.state_dict().items():
        tensors.setdefault(name, buffer.detach().cpu().contiguous().clone())
    return tensors


def save_finetune_checkpoint(directory: str, engine: Any, state: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shards; rank 0 also the consolidated fp32 weights (what the
    driver publishes) and the step. A collective."""
    from safetensors.torch import save

    from visuray.train.deepspeed_engine import save_engine_checkpoint

    save_engine_checkpoint(engine, Path(directory, CKPT_ENGINE_DIR))
    weights = consolidated_state_dict(engine)
    if rank == 0:
        Path(directory, CKPT_WEIGHTS).write_bytes(save(weights))
        Path(directory, CKPT_STATE).write_text(json.dumps(state))


def restore_finetune_checkpoint(
    checkpoint: ray.train.Checkpoint, engine: Any, world_size: int, zero_stage: int
) -> dict[str, Any]:
    """Load the engine's module and optimizer state; return the saved state (step, loss, ...)."""
    from visuray.train.deepspeed_engine import load_engine_checkpoint

    with checkpoint.as_directory() as directory:
        state = json.loads(Path(directory, CKPT_STATE).read_text())
        if state.get("world_size") != world_size or state.get("zero_stage") != zero_stage:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by {state.get('world_size')} worker(s) at ZeRO "
                f"stage {state.get('zero_stage')}; this run has {world_size} at stage {zero_stage}. Resume "
                "with the same scaling.num_workers and deepspeed.zero_stage (ZeRO shards are per rank)"
            )
        load_engine_checkpoint(engine, Path(directory, CKPT_ENGINE_DIR))
    return state


# ----------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker; returns (from rank 0, kept as ``Result.return_value``) the run's summary."""
    cfg = FinetuneConfig.model_validate(config["job"])
    tc = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # the same initial weights on every rank

    # ---------------- data ----------------
    spec = cfg.model.backbone.input_spec
    dataset = CatalogTorchDataset(cfg.catalog, cfg.storage, transform=train_transform(spec), as_tuple=True)
    labels = training_labels(dataset, cfg)
    # The loader yields (image, dataset.labels[i]): for the adaptive triplet loss, the fine classes.
    dataset.labels = labels.labels
    sampler = build_sampler(labels, tc, rank, world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=tc.data_workers)

    # ---------------- model, engine, restore ----------------
    model = build_embedding_model(cfg.model)
    checkpoint = ray.train.get_checkpoint()
    # Weights checked by the driver (check_pretrained) before the workers started; a resumed run restores
    # its own below.
    backbone_cfg = starting_point(cfg.model.backbone, cfg.init_from)
    prepare_for_training(model.backbone, backbone_cfg, cfg.storage, checkpoint is not None, tc.freeze_blocks)
    groups, group_info = finetune_param_groups(model, tc.weight_decay, tc.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr)
    bf16 = wants_bf16(cfg.deepspeed.precision)
    ds_config = resolve_deepspeed_config(config["deepspeed"], sampler.batch_size, tc.clip_grad_norm, bf16)
    engine = build_engine(model, optimizer, ds_config)
    input_dtype = engine_dtype(engine)
    param_groups = engine_param_groups(engine)
    state: dict[str, Any] = {"step": 0, "loss": None}
    if checkpoint is not None:
        state = restore_finetune_checkpoint(checkpoint, engine, world_size, cfg.deepspeed.zero_stage)
    loss_fn = build_loss(cfg.loss, labels.semantic_distances).to(device)
    schedule = lr_schedule(tc.lr, tc.min_lr, tc.steps, tc.warmup_steps)
    validation = None
    if cfg.validation.catalog is not None:
        validation = ValidationSet.load(cfg.validation, cfg.storage, spec)
    if rank == 0:
        origin = f"resuming at step {state['step']}" if checkpoint else "starting at step 0"
        log.info(
            "%s of %d; %d items, %d classes, P x K = %d x %d, loss %s, ZeRO-%d, %d worker(s) on %s",
            origin,
            tc.steps,
            len(dataset),
            sampler.num_classes,
            tc.p,
            tc.k,
            cfg.loss.name,
            cfg.deepspeed.zero_stage,
            world_size,
            device,
        )

    # ---------------- loop ----------------
    start_step, step, last_loss = int(state["step"]), int(state["step"]), state.get("loss")
    history: list[dict[str, float]] = []
    batches = endless_batches(loader, sampler, start_step)
    loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()
    engine.train()
    while step < tc.steps:
        images, batch_labels = next(batches)
        lr = schedule[step]
        set_learning_rates(param_groups, group_info, lr, backbone_frozen=step < tc.freeze_backbone_steps)
        embeddings = engine(images.to(device, dtype=input_dtype, non_blocking=True))
        # The loss in fp32: bf16 distances near the margin would round most hinges to 0 or the margin.
        loss = loss_fn(embeddings.float(), batch_labels.to(device, non_blocking=True))
        engine.backward(loss)
        engine.step()  # clips to train.clip_grad_norm (DeepSpeed's gradient_clipping) and zeroes grads
        step += 1
        loss_sum += loss.detach()
        loss_count += 1

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
            "train/lr": lr,
            "train/tuples": loss_fn.last_num_tuples,
            "train/images_per_s": loss_count * sampler.batch_size * world_size / max(elapsed, 1e-9),
        }
        if validate:
            assert validation is not None
            engine.eval()
            val = validation.evaluate(
                lambda batch: engine(batch.to(device, dtype=input_dtype)), rank, world_size
            )
            engine.train()
            metrics |= val or {}
        common.record_step(history, metrics, tc.steps, save, log, rank)
        if save:
            saved = {
                "step": step,
                "loss": last_loss,
                "world_size": world_size,
                "zero_stage": cfg.deepspeed.zero_stage,
            }
            common.report_step(
                metrics, partial(save_finetune_checkpoint, engine=engine, state=saved, rank=rank)
            )
        else:
            common.report_step(metrics)
        loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()

    return {"start_step": start_step, "steps": step, "final_loss": last_loss, "history": history}
