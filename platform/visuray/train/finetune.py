"""Metric fine-tuning of an embedding model on Ray Train (triplet loss, online mining, P x K batches).

The driver (:func:`run_finetune`) builds a ``TorchTrainer`` around :func:`train_loop_per_worker`, a plain
loop that every worker runs: read the catalog, build the model, restore the latest Ray Train checkpoint if
the run has one, then step, log, report and checkpoint. After ``fit()`` the weights of the last checkpoint
are published as a model artifact (:func:`visuray.checkpoint.save_model`).

Resuming: a run is identified by ``run_dir`` + ``name``. Running the job again with the same two (for
example with more ``train.steps``) restores Ray Train's checkpoint manager from that folder, and the loop
continues from the latest checkpoint: weights, optimizer state and step. The data order is a function of
(seed, step), so a resumed run sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from visuray.config import StrictModel
from visuray.models.embedding import EmbeddingModelConfig
from visuray.storage import StorageOptions, get_filesystem, is_remote

if TYPE_CHECKING:
    import ray.train
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# Files of one Ray Train checkpoint (a directory); weights in safetensors, optimizer state loaded back with
# torch.load(weights_only=True), which refuses anything but tensors and plain containers.
CKPT_WEIGHTS = "model.safetensors"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "train_state.json"


class TrainSection(StrictModel):
    """Optimisation and bookkeeping of the loop."""

    steps: int = Field(1000, ge=1, description="optimizer steps in total (a resumed run continues to this)")
    p: int = Field(
        8,
        ge=2,
        description="P: classes per batch; at least 2 so every anchor has negatives. P*K=64 fits a small "
        "GPU at 224 px; raise P rather than K for more negatives",
    )
    k: int = Field(
        4,
        ge=2,
        description="K: items per class; 4 is the usual batch-hard choice (Hermans et al.): enough "
        "positives to mine from, while most product classes have at least 4 photos",
    )
    lr: float = Field(3e-4, gt=0, description="peak AdamW learning rate; 3e-4 suits ViT-tiny at P*K=32-64")
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine decay (DINO's choice)")
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW decay on weight matrices only (not biases/norms); 0.05 as for ViTs"
    )
    warmup_steps: int = Field(
        50, ge=0, description="linear warm-up; ViTs diverge with a full learning rate from the first step"
    )
    clip_grad_norm: float | None = Field(
        3.0, gt=0, description="gradient-norm clip (DINO uses 3.0); guards against hard-triplet spikes"
    )
    margin: float = Field(
        0.2, ge=0, description="triplet margin; 0.2 on cosine distance (range [0, 2]) is a common start"
    )
    distance: Literal["cosine", "euclidean"] = Field(
        "cosine", description="cosine matches the inner-product index the embeddings are served from"
    )
    miner: Literal["batch_hard"] = Field(
        "batch_hard", description="online in-batch mining; batch-hard is strong with P x K batches"
    )
    checkpoint_every: int = Field(
        200, ge=1, description="steps between Ray Train checkpoints (the last step is always saved)"
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="the latest N checkpoints are kept; 2 survives a torn write"
    )
    log_every: int = Field(10, ge=1, description="steps between a log line and a ray.train.report of metrics")
    seed: int = Field(0, description="initialisation and batch order; equal seeds give equal runs")
    data_workers: int = Field(
        2,
        ge=0,
        description="DataLoader processes per training worker that decode and augment images; 0 decodes in "
        "the training process (tests, tiny catalogs)",
    )

    @model_validator(mode="after")
    def _warmup_ends_before_training(self) -> TrainSection:
        # An error rather than a silent cut: a short run (steps=10) must say how it warms up.
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self


class ScalingSection(StrictModel):
    """How many Ray Train workers, on what."""

    num_workers: int = Field(1, ge=1, description="data-parallel workers (DDP); one per GPU on a cluster")
    use_gpu: bool = Field(False, description="one GPU per worker; False runs everywhere, including CI")
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs reserved per worker; raise it with train.data_workers on real nodes"
    )
    max_failures: int = Field(
        1, ge=-1, description="worker-group restarts from the latest checkpoint before the run fails"
    )


class FinetuneConfig(StrictModel):
    """The ``finetune`` job: catalog in, model artifact out."""

    job: Literal["finetune"] = "finetune"
    name: str = Field(
        "finetune",
        min_length=1,
        description="Ray Train run name; rerunning with the same name and run_dir resumes that run",
    )
    storage: StorageOptions = Field(default_factory=StorageOptions)
    catalog: str = Field(..., description="URI of a published catalog with labels (see the ingest job)")
    output: str = Field(..., description="URI of the model artifact to publish a new version into")
    run_dir: str = Field(
        "./runs/train",
        description="Ray Train storage path for checkpoints; local paths are made absolute. Use shared "
        "storage (s3://) on a multi-node cluster so any node can resume",
    )
    init_from: str | None = Field(
        None, description="model artifact whose backbone initialises this one (e.g. an SSL checkpoint)"
    )
    model: EmbeddingModelConfig = Field(default_factory=EmbeddingModelConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------


def lr_schedule(base_lr: float, min_lr: float, steps: int, warmup_steps: int) -> list[float]:
    """Learning rate of every step: linear warm-up, then cosine decay to ``min_lr`` (precomputed)."""
    schedule = []
    for step in range(steps):
        if step < warmup_steps:
            schedule.append(base_lr * (step + 1) / warmup_steps)
        else:
            progress = (step - warmup_steps) / max(1, steps - warmup_steps)
            schedule.append(min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress)))
    return schedule


def train_transform(img_size: int) -> Any:
    """Light augmentation for metric learning: the same product under crops and flips stays the same."""
    import torch
    from torchvision.transforms import v2

    from visuray.images import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(img_size, scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and kernels only: decaying biases, norms and tokens hurts ViTs."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mean_across_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (guarded: a single process needs no process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


@dataclass
class TrainState:
    """What a Ray Train checkpoint restores besides the weights."""

    step: int = 0
    loss: float | None = None
    optimizer: dict[str, Any] | None = field(default=None, repr=False)


def save_train_checkpoint(directory: str, model: nn.Module, optimizer: Any, step: int, loss: float) -> None:
    import torch

    from visuray.checkpoint import state_dict_bytes

    Path(directory, CKPT_WEIGHTS).write_bytes(state_dict_bytes(model))
    torch.save(optimizer.state_dict(), os.path.join(directory, CKPT_OPTIMIZER))
    Path(directory, CKPT_STATE).write_text(json.dumps({"step": step, "loss": loss}))


def load_train_checkpoint(checkpoint: ray.train.Checkpoint, model: nn.Module) -> TrainState:
    """Load the weights into ``model`` (strictly) and return the step, last loss and optimizer state."""
    import torch

    from visuray.checkpoint import load_state_dict_strict, tensors_from_bytes

    with checkpoint.as_directory() as directory:
        tensors = tensors_from_bytes(Path(directory, CKPT_WEIGHTS).read_bytes())
        load_state_dict_strict(model, tensors, f"Ray Train checkpoint {checkpoint.path}")
        optimizer_path = Path(directory, CKPT_OPTIMIZER)
        optimizer = (
            torch.load(optimizer_path, map_location="cpu", weights_only=True)
            if optimizer_path.exists()
            else None
        )
        state = json.loads(Path(directory, CKPT_STATE).read_text())
    return TrainState(step=int(state["step"]), loss=state.get("loss"), optimizer=optimizer)


def endless_batches(loader: Any, sampler: Any, start_step: int) -> Any:
    """Batches from ``loader`` epoch after epoch, starting where step ``start_step`` left off."""
    epoch, skip = divmod(start_step, sampler.num_batches)
    while True:
        sampler.set_epoch(epoch, start_batch=skip)
        yield from loader
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker; returns (from rank 0, kept as ``Result.return_value``) the run's summary."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader

    from visuray.catalog.readers import CatalogTorchDataset
    from visuray.checkpoint import load_backbone_weights
    from visuray.losses.triplet import MINERS, TripletMarginLoss
    from visuray.models.embedding import build_embedding_model
    from visuray.samplers import PKSampler

    cfg = FinetuneConfig.model_validate(config)
    tc = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)

    # ---------------- data ----------------
    dataset = CatalogTorchDataset(
        cfg.catalog, cfg.storage, transform=train_transform(cfg.model.backbone.img_size), as_tuple=True
    )
    sampler = PKSampler(dataset.labels, tc.p, tc.k, seed=tc.seed, rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=tc.data_workers)

    # ---------------- model, optimizer, restore ----------------
    model = build_embedding_model(cfg.model)
    checkpoint = ray.train.get_checkpoint()
    state = load_train_checkpoint(checkpoint, model) if checkpoint else TrainState()
    if checkpoint is None and cfg.init_from:
        load_backbone_weights(model.backbone, cfg.init_from, cfg.storage)
    model = ray.train.torch.prepare_model(model)  # moves to the device; wraps in DDP when world_size > 1
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, tc.weight_decay), lr=tc.lr)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    loss_fn = TripletMarginLoss(margin=tc.margin, distance=tc.distance, miner=MINERS[tc.miner]())
    schedule = lr_schedule(tc.lr, tc.min_lr, tc.steps, tc.warmup_steps)
    if rank == 0:
        origin = f"resuming at step {state.step}" if checkpoint else "starting at step 0"
        log.info(
            "%s of %d; %d items, %d classes, P x K = %d x %d, %d worker(s) on %s",
            origin,
            tc.steps,
            len(dataset),
            sampler.num_classes,
            tc.p,
            tc.k,
            world_size,
            device,
        )

    # ---------------- loop ----------------
    start_step, step, last_loss = state.step, state.step, state.loss
    history: list[dict[str, float]] = []
    batches = endless_batches(loader, sampler, start_step)
    loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()
    model.train()
    while step < tc.steps:
        images, labels = next(batches)
        lr = schedule[step]
        for group in optimizer.param_groups:
            group["lr"] = lr
        embeddings = model(images.to(device, non_blocking=True))
        loss = loss_fn(embeddings, labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
        optimizer.step()
        step += 1
        loss_sum += loss.detach()
        loss_count += 1

        save = step % tc.checkpoint_every == 0 or step == tc.steps
        if not (save or step % tc.log_every == 0):
            continue
        # Every rank reaches this point at the same steps: report() is a barrier across workers.
        last_loss = mean_across_ranks(loss_sum / loss_count)
        elapsed = time.monotonic() - started
        metrics = {
            "step": step,
            "start_step": start_step,
            "train/loss": last_loss,
            "train/lr": lr,
            "train/triplets": loss_fn.last_num_triplets,
            "train/images_per_s": loss_count * sampler.batch_size * world_size / max(elapsed, 1e-9),
        }
        history.append({"step": step, "train/loss": last_loss})
        if rank == 0:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.1f img/s%s",
                step,
                tc.steps,
                last_loss,
                lr,
                metrics["train/images_per_s"],
                " (checkpoint)" if save else "",
            )
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_train_checkpoint(directory, model, optimizer, step, last_loss)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()

    return {"start_step": start_step, "steps": step, "final_loss": last_loss, "history": history}


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------


def ray_storage(run_dir: str, options: StorageOptions) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: local paths made absolute; s3:// through the
    same s3fs settings (endpoint, keys) as every other artifact, wrapped for Arrow."""
    if not is_remote(run_dir):
        return str(Path(run_dir.removeprefix("file://")).expanduser().absolute()), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = get_filesystem(run_dir, options)
    return path, PyFileSystem(FSSpecHandler(fs))


def build_trainer(cfg: FinetuneConfig) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = ray_storage(cfg.run_dir, cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
        ),
    )


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train on Ray Train, publish the final weights as a model artifact, return the run's summary."""
    from visuray.checkpoint import save_model
    from visuray.cluster import ensure_ray
    from visuray.models.embedding import build_embedding_model

    ensure_ray()
    log.info("finetune %r: %d steps on %s -> %s", cfg.name, cfg.train.steps, cfg.catalog, cfg.output)
    result = build_trainer(cfg).fit()  # raises TrainingFailedError when the run fails

    # Result.metrics and Result.checkpoint describe the latest *checkpointed* report only (metrics reported
    # without a checkpoint are not kept), so the loop always checkpoints its last step, and the summary
    # comes from rank 0's return value, with the checkpoint's own state as the fallback.
    if result.checkpoint is None:
        raise RuntimeError(f"finetune run {cfg.name!r} finished without a checkpoint at {result.path}")
    model = build_embedding_model(cfg.model)
    state = load_train_checkpoint(result.checkpoint, model)
    summary = dict(result.return_value or {})
    final_loss = summary.get("final_loss", state.loss)
    artifact = save_model(
        cfg.output,
        model,
        cfg.model,
        job_cfg=cfg,
        metadata={
            "trained_by": "finetune",
            "train_steps": state.step,
            "final_loss": final_loss,
            "catalog": cfg.catalog,
        },
        options=cfg.storage,
    )
    log.info("published model %s (version %s)", artifact.uri, artifact.manifest.version)
    return {
        "output": artifact.uri,
        "model_version": artifact.manifest.version,
        "steps": state.step,
        "start_step": summary.get("start_step"),
        "final_loss": final_loss,
        "history": summary.get("history", []),
        "run_path": result.path,
        "checkpoint": result.checkpoint.path,
    }
