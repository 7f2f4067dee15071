"""The per-worker loop of the ``train_fusion`` job (:func:`train_loop_per_worker`) and its pieces (shared
with the benchmark): batches as a function of (seed, step), targets, the objective, pretrained parts, the
optimizer, training steps and the Ray Train checkpoints.

Every worker decodes the images of the subset once (uint8, ``img_size``), restores the latest Ray Train
checkpoint if any, steps, reports, checkpoints; then rank 0 evaluates on the held-out products and returns
the metrics plus a few ranked lists for the report (``Result.return_value``). Resuming works as in the other
jobs: same ``run_dir`` + ``name`` restores weights, optimizer and step; batches are a function of
(seed, step), so a resumed run sees what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train
import ray.train.torch
import torch

from visuray.checkpoint import unwrap_model
from visuray.fusion.config import FusionTrainConfig, FusionTrainSection, validation_metric_names
from visuray.fusion.data import ImageTensorCache, build_fusion_data, load_items
from visuray.fusion.datasets import (
    ComposedQuery,
)
from visuray.fusion.evaluate import evaluate
from visuray.fusion.tokenizer import TextTokenizer
from visuray.models.config import BackboneConfig
from visuray.models.weights import prepare_for_training
from visuray.train import common
from visuray.train.common import mean_across_ranks
from visuray.train.schedules import lr_schedule

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

CKPT_WEIGHTS = "objective.safetensors"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "train_state.json"


def batch_indices(
    num_queries: int, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """This rank's query indices at ``step``: a function of (seed, step) only, so resuming is exact."""
    import numpy as np

    rng = np.random.default_rng([seed, step])
    total = batch_size * world_size
    picked = rng.choice(num_queries, size=total, replace=num_queries < total)
    return [int(i) for i in picked[rank * batch_size : (rank + 1) * batch_size]]


def pick_targets(queries: Sequence[ComposedQuery], seed: int, step: int) -> list[str]:
    """One relevant item per query as its training target (varies with the step: all answers get used)."""
    import numpy as np

    rng = np.random.default_rng([seed, step, 1])
    return [q.relevant_ids[int(rng.integers(len(q.relevant_ids)))] for q in queries]


def ignore_mask(queries: Sequence[ComposedQuery], targets: Sequence[str]) -> torch.Tensor:
    """``[i, j]`` True where row j's target also answers query i: not a negative for i."""
    import torch

    relevant = [set(q.relevant_ids) for q in queries]
    return torch.tensor([[t in rel for t in targets] for rel in relevant], dtype=torch.bool)


def build_objective(cfg: FusionTrainConfig) -> nn.Module:
    """The fusion model of ``cfg.model`` wrapped with its contrastive loss (random init)."""
    from visuray.fusion.losses import BatchSoftmaxContrastiveLoss, FusionObjective
    from visuray.fusion.model import build_fusion_model

    loss = BatchSoftmaxContrastiveLoss(cfg.train.temperature, cfg.train.learnable_temperature)
    return FusionObjective(build_fusion_model(cfg.model), loss)


def image_backbone(cfg: FusionTrainConfig) -> BackboneConfig:
    """The image encoder's backbone config with ``image_init_from`` as its weights when set."""
    from visuray.models.weights import starting_point

    return starting_point(cfg.model.backbone, cfg.image_init_from)


def init_pretrained_parts(model: nn.Module, cfg: FusionTrainConfig) -> list[str]:
    """Load the pretrained image backbone (``model.backbone.weights``, or ``image_init_from``) and text
    encoder (``text_init_from``) named in ``cfg``; returns where each came from."""
    from visuray.fusion.model import load_text_encoder_weights
    from visuray.models.weights import load_pretrained

    loaded = []
    image = load_pretrained(model.image_encoder.backbone, image_backbone(cfg), cfg.storage)
    if image is not None:
        loaded.append(image.source.uri)
    if cfg.text_init_from:
        loaded.append(load_text_encoder_weights(model.text_encoder, cfg.text_init_from, cfg.storage).uri)
    return loaded


def optimizer_for(objective: nn.Module, tc: FusionTrainSection) -> Any:
    """AdamW with decay on matrices only; the composer's groups carry ``lr_scale`` (see train_steps)."""
    import torch

    from visuray.train.common import decay_param_groups

    if tc.composer_lr_scale == 1.0:  # the two groups checkpoints written before the multiplier hold
        return torch.optim.AdamW(decay_param_groups(objective, tc.weight_decay), lr=tc.lr)
    groups: list[dict[str, Any]] = []
    for is_composer in (False, True):
        params = [
            (name, p)
            for name, p in objective.named_parameters()
            if p.requires_grad and (".composer." in f".{name}") == is_composer
        ]
        scale = tc.composer_lr_scale if is_composer else 1.0
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        groups += [
            {"params": decay, "weight_decay": tc.weight_decay, "lr_scale": scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr)


def train_steps(
    objective: nn.Module,
    optimizer: Any,
    queries: Sequence[ComposedQuery],
    cache: ImageTensorCache,
    tokenizer: TextTokenizer,
    tc: FusionTrainSection,
    start_step: int,
    device: Any,
    on_step: Callable[[int, torch.Tensor, float], None],
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Steps ``start_step`` .. ``tc.steps``; ``on_step(step, loss, lr)`` after each (logging, checkpoints)."""
    import torch

    schedule = lr_schedule(tc.lr, tc.min_lr, tc.steps, tc.warmup_steps)
    objective.train()
    step = start_step
    while step < tc.steps:
        picked = [
            queries[i] for i in batch_indices(len(queries), step, tc.batch_size, tc.seed, rank, world_size)
        ]
        targets = pick_targets(picked, tc.seed + rank, step)
        generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 31 + rank)
        flips = torch.rand(2, len(picked), generator=generator) < 0.5 if tc.flip else [None, None]
        reference = cache.batch([q.reference_id for q in picked], flips[0]).to(device)
        target = cache.batch(targets, flips[1]).to(device)
        ids, padding = tokenizer([q.text for q in picked])
        lr = schedule[step]
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss = objective(
            reference, ids.to(device), padding.to(device), target, ignore_mask(picked, targets).to(device)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), tc.clip_grad_norm)
        optimizer.step()
        step += 1
        on_step(step, loss.detach(), lr)
    return step


def save_train_checkpoint(
    directory: str, objective: nn.Module, optimizer: Any, step: int, loss: float
) -> None:
    import torch

    from visuray.checkpoint import state_dict_bytes

    Path(directory, CKPT_WEIGHTS).write_bytes(state_dict_bytes(objective))
    torch.save(optimizer.state_dict(), Path(directory, CKPT_OPTIMIZER))
    Path(directory, CKPT_STATE).write_text(json.dumps({"step": step, "loss": loss}))


def load_train_checkpoint(checkpoint: ray.train.Checkpoint, objective: nn.Module) -> dict[str, Any]:
    """Weights into ``objective`` (strictly); returns step, loss and the optimizer state."""
    import torch

    from visuray.checkpoint import load_state_dict_strict, tensors_from_bytes

    with checkpoint.as_directory() as directory:
        tensors = tensors_from_bytes(Path(directory, CKPT_WEIGHTS).read_bytes())
        load_state_dict_strict(objective, tensors, f"Ray Train checkpoint {checkpoint.path}")
        state = json.loads(Path(directory, CKPT_STATE).read_text())
        state["optimizer"] = torch.load(
            Path(directory, CKPT_OPTIMIZER), map_location="cpu", weights_only=True
        )
    return state


# ----------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker; rank 0 returns the summary (metrics, report examples) as ``return_value``."""
    cfg = FusionTrainConfig.model_validate(config["cfg"])
    tokenizer = TextTokenizer.from_json(config["tokenizer"], cfg.model.text.max_length)
    tc = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)

    # ---------------- data ----------------
    items, _ = load_items(cfg.catalog, cfg.data, cfg.storage)
    data = build_fusion_data(items, cfg.data)
    cache = ImageTensorCache(cfg.catalog, data.all_ids(), cfg.model.backbone.input_spec, cfg.storage)

    # ---------------- model, optimizer, restore ----------------
    objective = build_objective(cfg)
    checkpoint = ray.train.get_checkpoint()
    state = load_train_checkpoint(checkpoint, objective) if checkpoint else {"step": 0, "loss": None}
    if checkpoint is None:
        init_pretrained_parts(objective.model, cfg)
    # the starting weights were loaded above (not on resume): only the frozen blocks and BatchNorm policy
    prepare_for_training(
        objective.model.image_encoder.backbone,
        image_backbone(cfg),
        resumed=True,
        freeze_blocks=tc.freeze_blocks,
    )
    objective = ray.train.torch.prepare_model(objective)
    optimizer = optimizer_for(objective, tc)
    if state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if rank == 0:
        log.info(
            "%s of %d; %d train / %d test queries, %d gallery items, fusion %s depth %d, %d worker(s)",
            f"resuming at step {state['step']}" if checkpoint else "starting at step 0",
            tc.steps,
            len(data.train_queries),
            len(data.test_queries),
            len(data.gallery_ids),
            cfg.model.fusion,
            cfg.model.fusion_depth,
            world_size,
        )

    # ---------------- loop ----------------
    start_step, last_loss = int(state["step"]), state["loss"]
    history: list[dict[str, float]] = []
    window = {"sum": torch.zeros((), device=device), "count": 0, "started": time.monotonic()}

    def on_step(step: int, loss: torch.Tensor, lr: float) -> None:
        nonlocal last_loss
        window["sum"] += loss
        window["count"] += 1
        save = common.is_due(step, tc.checkpoint_every, tc.steps)
        validate = bool(data.val_queries) and common.is_due(step, tc.validate_every, tc.steps)
        if not (save or validate or step % tc.log_every == 0):
            return
        last_loss = mean_across_ranks(window["sum"] / window["count"])  # every rank reaches this together
        elapsed = max(time.monotonic() - window["started"], 1e-9)
        metrics = {
            "step": step,
            "start_step": start_step,
            "train/loss": last_loss,
            "train/lr": lr,
            "train/temperature": unwrap_model(objective).loss.temperature,
            "train/queries_per_s": window["count"] * tc.batch_size * world_size / elapsed,
        }
        if validate and rank == 0:  # rank 0 holds every image; the other ranks report their losses only
            val = evaluate(
                unwrap_model(objective).model, cache, tokenizer, data, cfg.eval, split="val"
            ).metrics
            metrics |= {k: v for k, v in val.items() if k in validation_metric_names(cfg)}
        common.record_step(history, metrics, tc.steps, save, log, rank)
        writer = None  # rank 0 writes the (unsharded) state; the other ranks report their losses only
        if save and rank == 0:
            writer = partial(
                save_train_checkpoint, objective=objective, optimizer=optimizer, step=step, loss=last_loss
            )
        common.report_step(metrics, writer)
        window.update(sum=torch.zeros((), device=device), count=0, started=time.monotonic())

    step = train_steps(
        objective,
        optimizer,
        data.train_queries,
        cache,
        tokenizer,
        tc,
        start_step,
        device,
        on_step,
        rank,
        world_size,
    )

    summary: dict[str, Any] = {
        "start_step": start_step,
        "steps": step,
        "final_loss": last_loss,
        "history": history,
    }
    if rank == 0:
        held_out = evaluate(unwrap_model(objective).model, cache, tokenizer, data, cfg.eval)
        metrics, examples = held_out.metrics, held_out.examples
        summary.update(
            metrics=metrics,
            examples=examples,
            num_train_queries=len(data.train_queries),
            num_test_queries=len(data.test_queries),
            num_gallery=len(data.gallery_ids),
        )
        log.info("held-out: %s", {k: round(v, 4) for k, v in metrics.items() if k.count("/") == 1})
    return summary
