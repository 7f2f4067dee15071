"""What the training jobs (pretrain, finetune, train_fusion, train_attributes) share besides the Ray Train
wiring of :mod:`visuray.train.ray_job`: the config fields every job has (``name``, ``run_dir``, the
``scaling`` section, the bookkeeping fields of the ``train`` section), the learning-rate schedule, AdamW
groups, a mean across ranks, and the plain (non-DeepSpeed) Ray Train checkpoint format.

The field helpers return a pydantic ``Field`` for a job's own config model, so every job keeps its field
order (and its defaults) while the constraints and descriptions are written once.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pydantic import Field, model_validator

from visuray.config import StrictModel
from visuray.storage import StorageOptions

if TYPE_CHECKING:
    import ray.train
    import torch
    from torch import nn

# Files of one Ray Train checkpoint (a directory); weights in safetensors, optimizer state loaded back with
# torch.load(weights_only=True), which refuses anything but tensors and plain containers.
CKPT_WEIGHTS = "model.safetensors"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "train_state.json"


# ----------------------------------------------------------------------------------------------------
# Config: fields and sections every job has
# ----------------------------------------------------------------------------------------------------


def run_name_field(default: str) -> Any:
    """A job's ``name``: its Ray Train run."""
    return Field(
        default,
        min_length=1,
        description="Ray Train run name; rerunning with the same name and run_dir resumes that run",
    )


def run_dir_field(default: str = "./runs/train") -> Any:
    """A job's ``run_dir``: where Ray Train keeps its runs (see :func:`visuray.train.ray_job.ray_storage`)."""
    return Field(
        default,
        description="Ray Train storage path for checkpoints; local paths are made absolute. Use shared "
        "storage (s3://) on a multi-node cluster so any node can resume",
    )


def total_steps_field(default: int) -> Any:
    """``train.steps``."""
    return Field(default, ge=1, description="optimizer steps in total (a resumed run continues to this)")


def checkpoint_every_field(default: int = 200) -> Any:
    """``train.checkpoint_every``."""
    return Field(
        default, ge=1, description="steps between Ray Train checkpoints (the last step is always saved)"
    )


def keep_checkpoints_field(default: int = 2) -> Any:
    """``train.keep_checkpoints`` (Ray Train's ``CheckpointConfig.num_to_keep``)."""
    return Field(default, ge=1, description="the latest N checkpoints are kept; 2 survives a torn write")


def freeze_blocks_field(default: int = 0) -> Any:
    """``train.freeze_blocks`` (:func:`visuray.models.backbone.freeze_first_blocks`)."""
    return Field(
        default,
        ge=0,
        description="freeze the stem and the first N block groups (ViT blocks, CNN stages; their BatchNorm "
        "statistics too) for the whole run: keeps the generic low-level features of a pretrained backbone "
        "and saves their gradients, a large share of a CNN's training time. 0 = none",
    )


def init_from_field(what: str = "this one") -> Any:
    """A job's ``init_from``: a Visuray model artifact whose backbone starts ``what``."""
    return Field(
        None,
        description=f"model artifact whose backbone initialises {what} (e.g. a DINO-continued model); the "
        "same as model.backbone.weights=<artifact>, and replaces it when set",
    )


def log_every_field(default: int = 10) -> Any:
    """``train.log_every``."""
    return Field(default, ge=1, description="steps between a log line and a ray.train.report of metrics")


class TrainingJobConfig(StrictModel):
    """What every training job's spec starts with: the job, the run's name, storage, the catalog it reads,
    the artifact it publishes and where its run (checkpoints) lives. Each job's config derives from it."""

    job: str
    name: str = run_name_field("train")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    catalog: str = Field(..., description="URI of a published catalog (see the ingest job)")
    output: str = Field(..., description="URI of the artifact to publish a new version into")
    run_dir: str = run_dir_field()


class TrainLoopSection(StrictModel):
    """Base of the jobs' ``train`` sections, which declare ``steps`` and ``warmup_steps``: the warm-up must
    end before training does."""

    @model_validator(mode="after")
    def _warmup_ends_before_training(self) -> Self:
        # An error rather than a silent cut: a short run (steps=10) must say how it warms up.
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self


class ScalingSection(StrictModel):
    """How many Ray Train workers, on what."""

    num_workers: int = Field(1, ge=1, description="data-parallel workers; one per GPU on a cluster")
    use_gpu: bool = Field(False, description="one GPU per worker; False runs everywhere, including CI")
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs reserved per worker; raise it with train.data_workers on real nodes"
    )
    max_failures: int = Field(
        1, ge=-1, description="worker-group restarts from the latest checkpoint before the run fails"
    )


# ----------------------------------------------------------------------------------------------------
# Pieces of the loops
# ----------------------------------------------------------------------------------------------------


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and kernels only: decaying biases, norms and tokens hurts ViTs."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_due(step: int, every: int, total: int) -> bool:
    """Whether something done every ``every`` steps (and always at the last) happens at ``step``."""
    return step % every == 0 or step == total


def report_step(metrics: dict[str, Any], write_checkpoint: Callable[[str], None] | None = None) -> None:
    """``ray.train.report`` of one step's ``metrics``; with a checkpoint when ``write_checkpoint`` is given
    (it fills a temporary folder, which Ray Train then persists to the run's storage)."""
    import ray.train

    if write_checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def record_step(
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    total_steps: int,
    saved: bool,
    logger: Any,
    rank: int,
) -> None:
    """Keep one report in the run's history and, on rank 0, log it as one line: the step, the loss, and
    what of the learning rate, throughput and ``val/*`` metrics the report carries."""
    history.append(history_entry(metrics))
    if rank != 0:
        return
    line = f"step {metrics['step']}/{total_steps} loss {metrics['train/loss']:.4f}"
    if "train/lr" in metrics:
        line += f" lr {metrics['train/lr']:.2e}"
    if "train/images_per_s" in metrics:
        line += f" {metrics['train/images_per_s']:.1f} img/s"
    logger.info("%s%s%s", line, validation_text(metrics), " (checkpoint)" if saved else "")


def run_summary(
    artifact: Any, result: Any, summary: dict[str, Any], steps: int, final_loss: float | None, **extra: Any
) -> dict[str, Any]:
    """What a training job returns (and ``visuray run`` prints): the artifact it published, the steps, the
    loss, rank 0's history of reports, where the run and its last checkpoint are, and ``extra``."""
    return {
        "output": artifact.uri,
        "model_version": artifact.manifest.version,
        "steps": steps,
        "start_step": summary.get("start_step"),
        "final_loss": final_loss,
        "history": summary.get("history", []),
        "run_path": result.path,
        "checkpoint": result.checkpoint.path,
        **extra,
    }


def history_entry(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a run's summary keeps of one report: the step, the training loss and any validation metric."""
    return {k: v for k, v in metrics.items() if k in ("step", "train/loss") or k.startswith("val/")}


def validation_text(metrics: dict[str, Any]) -> str:
    """The ``val/*`` metrics of a report, for its log line (empty when the report has none)."""
    return "".join(f" {k} {v:.4f}" for k, v in metrics.items() if k.startswith("val/"))


def mean_across_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (guarded: a single process needs no process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


# ----------------------------------------------------------------------------------------------------
# Plain checkpoints: weights, optimizer state, step
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a Ray Train checkpoint restores besides the weights."""

    step: int = 0
    loss: float | None = None
    optimizer: dict[str, Any] | None = field(default=None, repr=False)


def save_train_checkpoint(directory: str, model: nn.Module, optimizer: Any, step: int, loss: float) -> None:
    """A plain (non-DeepSpeed) checkpoint: weights, optimizer state and step (used by other jobs' loops)."""
    import torch

    from visuray.checkpoint import state_dict_bytes

    Path(directory, CKPT_WEIGHTS).write_bytes(state_dict_bytes(model))
    torch.save(optimizer.state_dict(), os.path.join(directory, CKPT_OPTIMIZER))
    Path(directory, CKPT_STATE).write_text(json.dumps({"step": step, "loss": loss}))


def load_train_checkpoint(checkpoint: ray.train.Checkpoint, model: nn.Module) -> TrainState:
    """Load the weights into ``model`` (strictly) and return the step, last loss and optimizer state
    (None when the checkpoint holds none, as the DeepSpeed checkpoints of the finetune job do)."""
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
