"""The per-worker loop of the ``train_attributes`` job (:func:`train_loop_per_worker`): every worker
decodes its shard of the training split once (uint8, model resolution), restores the latest Ray Train
checkpoint if the run has one, then steps, reports and checkpoints every ``train.checkpoint_every`` steps
(always the last). Batches and augmentations are functions of (seed, step), so a resumed run sees what the
uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import ray.train
import ray.train.torch
import torch

from visuray.attributes.config import VALIDATION_METRICS, AttributeModelConfig, AttributeTrainConfig
from visuray.attributes.data import augment, batch_indices, decode_to_uint8, label_space_of, prepare_catalog
from visuray.attributes.fit import build_loss, predict_probabilities, training_step
from visuray.attributes.metrics import multilabel_report
from visuray.attributes.model import build_attribute_model
from visuray.models.weights import prepare_for_training, starting_point
from visuray.train import common
from visuray.train.common import (
    TrainState,
    decay_param_groups,
    load_train_checkpoint,
    mean_across_ranks,
    save_train_checkpoint,
)
from visuray.train.schedules import lr_schedule

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker; rank 0's summary comes back as ``Result.return_value``."""
    cfg = AttributeTrainConfig.model_validate(config["job"])
    model_cfg = AttributeModelConfig.model_validate(config["model"])
    tc = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)

    # ---------------- data: this rank's shard of the training split, decoded once ----------------
    data = prepare_catalog(
        cfg.catalog,
        cfg.storage,
        cfg.labels.groups,
        cfg.split,
        cfg.labels.min_count,
        label_space_of(model_cfg),
    )
    mine = data.splits["train"][rank::world_size]
    images = decode_to_uint8([data.rows.image_bytes(i) for i in mine], model_cfg.backbone.img_size)
    targets = torch.from_numpy(data.targets[mine])
    known = torch.from_numpy(data.known[mine])
    val = data.splits["val"]
    val_images = None  # rank 0 scores the validation products (a few hundred images: cheap)
    if rank == 0 and len(val):
        val_images = decode_to_uint8([data.rows.image_bytes(i) for i in val], model_cfg.backbone.img_size)

    # ---------------- model, optimizer, restore ----------------
    model = build_attribute_model(model_cfg)
    checkpoint = ray.train.get_checkpoint()
    state = load_train_checkpoint(checkpoint, model) if checkpoint else TrainState()
    backbone_cfg = starting_point(model_cfg.backbone, cfg.init_from)  # checked by the driver
    prepare_for_training(model.backbone, backbone_cfg, cfg.storage, checkpoint is not None, tc.freeze_blocks)
    spec = model_cfg.backbone.input_spec
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(decay_param_groups(model, tc.weight_decay), lr=tc.lr)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    loss_fn = build_loss(cfg.loss, data.targets[data.splits["train"]], data.known[data.splits["train"]])
    loss_fn = loss_fn.to(device)
    schedule = lr_schedule(tc.lr, tc.min_lr, tc.steps, tc.warmup_steps)
    if rank == 0:
        log.info(
            "%s of %d; %d training products (%d on this rank), %d labels in %d groups, %d worker(s) on %s",
            f"resuming at step {state.step}" if checkpoint else "starting at step 0",
            tc.steps,
            len(data.splits["train"]),
            len(mine),
            len(data.space),
            len(data.space.groups),
            world_size,
            device,
        )

    # ---------------- loop ----------------
    start_step, step, last_loss = state.step, state.step, state.loss
    history: list[dict[str, float]] = []
    loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()
    model.train()
    while step < tc.steps:
        rows = batch_indices(len(mine), tc.batch_size, tc.seed + 7919 * rank, step)
        generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        batch = spec.normalise(augment(images[rows], generator)).to(device, non_blocking=True)
        loss = training_step(
            model,
            optimizer,
            loss_fn,
            batch,
            targets[rows].to(device),
            known[rows].to(device),
            schedule[step],
            tc.clip_grad_norm,
        )
        step += 1
        loss_sum += loss
        loss_count += 1

        save = common.is_due(step, tc.checkpoint_every, tc.steps)
        validate = len(val) > 0 and common.is_due(step, tc.validate_every, tc.steps)
        if not (save or validate or step % tc.log_every == 0):
            continue
        last_loss = mean_across_ranks(loss_sum / loss_count)  # every rank gets here at the same steps
        elapsed = time.monotonic() - started
        metrics = {
            "step": step,
            "start_step": start_step,
            "train/loss": last_loss,
            "train/lr": schedule[step - 1],
            "train/images_per_s": loss_count * tc.batch_size * world_size / max(elapsed, 1e-9),
        }
        if validate and val_images is not None:
            scores = predict_probabilities(
                getattr(model, "module", model), val_images, spec, cfg.eval.batch_size, device
            )
            model.train()
            report = multilabel_report(
                scores, data.targets[val], data.known[val], data.space.names, cfg.eval.min_positives
            )
            metrics |= {name: report[name.removeprefix("val/")] for name in VALIDATION_METRICS}
        common.record_step(history, metrics, tc.steps, save, log, rank)
        writer = None  # rank 0 writes the (unsharded) state; the other ranks report their losses only
        if save and rank == 0:
            writer = partial(
                save_train_checkpoint, model=model, optimizer=optimizer, step=step, loss=last_loss
            )
        common.report_step(metrics, writer)
        loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()

    return {"start_step": start_step, "steps": step, "final_loss": last_loss, "history": history}
