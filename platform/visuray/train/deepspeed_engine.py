"""DeepSpeed engines for Ray Train workers: a ZeRO stage and a JSON config in, an engine out.

The JSON files under ``jobs/configs/deepspeed/zero{0,1,2,3}.json`` hold what is specific to a ZeRO stage
(bucket sizes, stage-3 prefetching). What follows from the job (micro-batch size, gradient clipping,
precision) is filled in here by :func:`resolve_deepspeed_config`, so one JSON serves every job.
Choices in those files, since JSON carries no comments:

- ``overlap_comm: false``: overlapping needs accelerator streams; on CPU (gloo) there are none. Turn it on
  for GPU clusters.
- ``stage3_param_persistence_threshold: 0`` (ZeRO-3): every parameter is partitioned, however small, so
  small models (and the tests) are really sharded. On large models 1e5 keeps biases and norms replicated
  and saves many tiny all-gathers.
- bucket sizes of 5e6 elements (20 MB at fp32): ZeRO-3 keeps a reduction bucket of this size standing,
  and at 5e7 (190 MiB) that bucket outweighed the whole gradient of a ViT-S/16 with its DINO head, so
  stage 3 held more per rank than stage 0 (``benchmarks/pretrain_memory.py``: 469 against 446 MiB; 298
  MiB at 5e6). Raise them towards DeepSpeed's 5e8 for billion-parameter models on GPUs, where bigger
  buckets mean fewer, more efficient collectives.

Precision: bf16 on GPU (no loss scaling needed, unlike fp16), fp32 on CPU, where DeepSpeed runs with its
CPU accelerator over the gloo process group that Ray Train created.

``deepspeed`` is imported only inside functions: the driver and the CLI never need it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from visuray.config import ConfigError, StrictModel

if TYPE_CHECKING:
    import torch
    from torch import nn

DEEPSPEED_CONFIG_DIR = Path("jobs") / "configs" / "deepspeed"
# The repository root when visuray runs from a checkout (editable install or Ray working_dir).
_REPO_ROOT = Path(__file__).resolve().parents[3]


class DeepSpeedSection(StrictModel):
    """Which ZeRO stage, which JSON, which precision."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="0 = plain data parallel; 1 shards optimizer state; 2 also gradients; 3 also parameters. "
        "2 is the usual sweet spot for ViT-S/B (states dominate memory, parameters fit); use 3 for "
        "models whose parameters alone do not fit one device",
    )
    config: str | None = Field(
        None,
        description="DeepSpeed JSON; None picks jobs/configs/deepspeed/zero<stage>.json. Its "
        "zero_optimization.stage must equal zero_stage",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto = bf16 where the worker has a GPU, fp32 on CPU (CPUs gain nothing from bf16 "
        "matmuls and DeepSpeed's CPU path is tested in fp32)",
    )


def deepspeed_config_file(zero_stage: int, path: str | None = None) -> Path:
    """The JSON for ``zero_stage``: ``path`` if given, else ``zero<stage>.json``, looked up relative to
    the working directory first, then to the repository root."""
    candidate = Path(path) if path else DEEPSPEED_CONFIG_DIR / f"zero{zero_stage}.json"
    for found in (candidate, _REPO_ROOT / candidate):
        if found.is_file():
            return found
    raise ConfigError(f"DeepSpeed config {candidate} not found (looked in . and {_REPO_ROOT})")


def load_deepspeed_config(zero_stage: int, path: str | None = None) -> dict[str, Any]:
    """Read the JSON for ``zero_stage`` and check that it is a config for that stage."""
    file = deepspeed_config_file(zero_stage, path)
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {file} is not valid JSON: {exc}") from None
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage != zero_stage:
        raise ConfigError(f"DeepSpeed config {file} is for ZeRO stage {stage}, the job asks for {zero_stage}")
    return data


def resolve_deepspeed_config(
    base: dict[str, Any],
    micro_batch_size: int,
    gradient_clipping: float | None,
    bf16: bool,
    gradient_accumulation_steps: int = 1,
) -> dict[str, Any]:
    """``base`` completed with what the job decides; keys the job sets override the JSON's."""
    cfg = copy.deepcopy(base)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = gradient_accumulation_steps
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    cfg["gradient_clipping"] = float(gradient_clipping or 0.0)  # 0 disables clipping in DeepSpeed
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg["fp16"] = {"enabled": False}
    return cfg


def wants_bf16(precision: str) -> bool:
    """Resolve ``precision`` ("auto" | "bf16" | "fp32") on this worker."""
    import torch

    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def disable_cpu_shm_comm() -> None:
    """On CPU, keep DeepSpeed on plain gloo instead of JIT-compiling its shared-memory comm extension.

    The extension is compiled on first use into ``~/.cache/torch_extensions`` (one to four minutes on a
    small machine), and processes that compute different compiler flags rebuild it over each other's
    copy, so every run can pay the compile again. gloo alone is correct and fast enough for CPU runs;
    set ``VISURAY_DEEPSPEED_SHM=1`` to let DeepSpeed build and use it anyway. DeepSpeed documents
    ``deepspeed.ops.__compatible_ops__`` as one cached dict whose edits persist.
    """
    import deepspeed.ops
    import torch

    if torch.cuda.is_available() or os.environ.get("VISURAY_DEEPSPEED_SHM") == "1":
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """Wrap ``model`` and its (client) optimizer in a DeepSpeed engine over the existing process group.

    Under Ray Train the process group already exists (gloo on CPU, NCCL on GPU); DeepSpeed adopts it.
    The returned engine's ``optimizer.param_groups`` are the client optimizer's groups, so per-group
    learning rates and weight decays set there each step are honoured at every ZeRO stage.
    """
    import deepspeed
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "build_engine needs a torch.distributed process group (run it in a Ray Train worker)"
        )
    disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine's module computes in (inputs are cast to it)."""
    import torch

    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def full_fp32_param(param: torch.Tensor) -> torch.Tensor | None:
    """The complete fp32 value of a parameter of a DeepSpeed engine's module, at any ZeRO stage.

    An fp32 parameter that ZeRO does not partition (stages 0-2 in fp32) is itself the full value: after
    ``engine.step()`` ZeRO-1/2 have all-gathered the updated master partitions into it, bit for bit. It is
    returned as is, with no communication (asking DeepSpeed for the master copy instead costs one
    all-reduce per parameter, dozens per step for an EMA teacher). With bf16 the module's copy is rounded,
    and ZeRO-3 shards the parameter itself: then ``safe_get_full_fp32_param`` all-gathers the fp32 master
    copy, a collective that every rank must call for the same parameters in the same order (the dtype and
    the stage are the same on every rank, so every rank takes the same branch). Frozen parameters (no
    master copy) give None under ZeRO-3.
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    if param.dtype == torch.float32 and not hasattr(param, "ds_id"):
        return param.detach()
    value = safe_get_full_fp32_param(param)
    if value is not None:
        return value
    if hasattr(param, "ds_id"):  # a frozen ZeRO-3 parameter: not updated, nothing to average
        return None
    return param.detach().float()


def engine_param_groups(engine_or_optimizer: Any) -> list[dict[str, Any]]:
    """The param groups whose ``lr`` / ``weight_decay`` a schedule sets (engine or bare optimizer)."""
    optimizer = getattr(engine_or_optimizer, "optimizer", engine_or_optimizer)
    return optimizer.param_groups


CHECKPOINT_TAG = "engine"


def save_engine_checkpoint(engine: Any, directory: str | Path, tag: str = CHECKPOINT_TAG) -> None:
    """Write the engine's module and optimizer state (each rank its own shards) under ``directory/tag``.

    A collective: every rank calls it with its own local ``directory``; Ray Train then merges the ranks'
    directories into one checkpoint (file names carry the rank, so they never collide).
    """
    engine.save_checkpoint(str(directory), tag=tag)


def load_engine_checkpoint(engine: Any, directory: str | Path, tag: str = CHECKPOINT_TAG) -> None:
    """Restore module and optimizer state written by :func:`save_engine_checkpoint` (same world size).

    DeepSpeed reads its own files with ``torch.load(weights_only=False)``: only load checkpoints that
    this run wrote into its own storage path, never ones from an untrusted source.
    """
    path, _ = engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
