"""The ``train_attributes`` job: a multi-label attribute model on Ray Train, evaluated and exported.

Driver (:func:`run_train_attributes`):

1. read the catalog, split products by hash (train / val / test), build the label space from the training
   split's metadata (:mod:`visuray.attributes.labels`);
2. fit a ``TorchTrainer`` around :func:`train_loop_per_worker`: every worker decodes its shard of the
   training split once (uint8, model resolution), restores the latest Ray Train checkpoint if the run has
   one, then steps, reports and checkpoints every ``train.checkpoint_every`` steps (always the last);
3. load the last checkpoint, score validation and test products, choose per-label thresholds on
   validation (F1), report per-label AUC/AP, macro/micro AUC and mAP on test (and on test products
   composited onto wild backgrounds when ``eval.wild_backgrounds`` is set), plot the ROC curves;
4. publish the attribute model artifact (:mod:`visuray.attributes.export`).

Resuming: rerunning with the same ``name`` and ``run_dir`` continues from the latest checkpoint (weights,
optimizer, step). Batches and augmentations are functions of (seed, step), so a resumed run sees what the
uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from visuray.attributes.fit import LossSection
from visuray.attributes.labels import (
    AttributeGroupSpec,
    LabelGroup,
    LabelSpace,
    build_label_space,
    encode_targets,
    fashion_groups,
)
from visuray.attributes.model import AttributeArchitecture, AttributeModelConfig, GroupHead
from visuray.config import StrictModel
from visuray.images import InputSpec
from visuray.storage import StorageOptions
from visuray.train import common

if TYPE_CHECKING:
    from torch import nn

    from visuray.catalog.readers import CatalogRows

log = logging.getLogger(__name__)


class LabelSection(StrictModel):
    """Which attribute groups become labels, and how frequent a value must be to become one."""

    groups: list[AttributeGroupSpec] = Field(
        default_factory=fashion_groups,
        min_length=1,
        description="the fashion-products groups by default (gender, category, article type, colour, usage, "
        "season); each may set its head's depth",
    )
    min_count: int = Field(
        20,
        ge=1,
        description="training items a value needs to become a label; below ~20 a label cannot be learnt and "
        "its test AUC would rest on a handful of products",
    )


class SplitSection(StrictModel):
    """Held-out products: a hash of (seed, item_id), stable across runs and workers."""

    seed: int = Field(0, description="changes which products are held out")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="products that choose the thresholds")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="products the metrics are reported on")

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitSection:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of products for training")
        return self


class AttributeTrainSection(common.TrainLoopSection):
    """Optimisation and bookkeeping of the loop."""

    steps: int = common.total_steps_field(2000)
    batch_size: int = Field(64, ge=1, description="per worker; 64 at 64 px is a fraction of a second on CPU")
    lr: float = Field(
        1e-3, gt=0, description="peak AdamW rate; 1e-3 suits a small ViT from scratch at batch 64"
    )
    min_lr: float = Field(1e-5, ge=0, description="end of the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay on matrices only, as for ViTs")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up; ViTs diverge at full rate from step one")
    clip_grad_norm: float | None = Field(3.0, gt=0, description="gradient-norm clip against early spikes")
    freeze_blocks: int = common.freeze_blocks_field()
    checkpoint_every: int = common.checkpoint_every_field()
    keep_checkpoints: int = common.keep_checkpoints_field()
    log_every: int = common.log_every_field()
    validate_every: int = Field(
        100,
        ge=1,
        description="steps between val/macro_auc, val/micro_auc and val/map reports on the validation products "
        "(also at the last step; none when split.val_fraction is 0): what a sweep ranks trials by",
    )
    seed: int = Field(0, description="initialisation, batch order and augmentation")


VALIDATION_METRICS = ("val/macro_auc", "val/micro_auc", "val/map")


class EvalSection(StrictModel):
    """The held-out evaluation after training."""

    min_positives: int = Field(
        5,
        ge=1,
        description="test positives (and negatives) a label needs to be scored; others are listed as too "
        "few, not averaged in",
    )
    wild_backgrounds: str | None = Field(
        None,
        description="also score the test products pasted onto backgrounds: 'clutter' (generated) or a "
        "folder of photos (e.g. clothing-small/test); None skips it",
    )
    wild_seed: int = Field(0, description="which background and crop each product gets")
    batch_size: int = Field(256, ge=1, description="inference batch")


class AttributeTrainConfig(StrictModel):
    """The ``train_attributes`` job: catalog in, attribute model artifact out."""

    job: Literal["train_attributes"] = "train_attributes"
    name: str = common.run_name_field("train-attributes")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    catalog: str = Field(..., description="URI of a published catalog whose rows carry the attributes")
    output: str = Field(..., description="URI of the attribute model artifact to publish into")
    run_dir: str = common.run_dir_field()
    init_from: str | None = Field(
        None,
        description="model artifact (embedding or SSL) whose backbone initialises this one; the same as "
        "model.backbone.weights=<artifact>, and replaces it when set",
    )
    model: AttributeArchitecture = Field(default_factory=AttributeArchitecture)
    labels: LabelSection = Field(default_factory=LabelSection)
    split: SplitSection = Field(default_factory=SplitSection)
    loss: LossSection = Field(default_factory=LossSection)
    train: AttributeTrainSection = Field(default_factory=AttributeTrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    scaling: common.ScalingSection = Field(default_factory=common.ScalingSection)


# ----------------------------------------------------------------------------------------------------
# Catalog -> rows, splits, label space
# ----------------------------------------------------------------------------------------------------


def row_metadata(rows: CatalogRows) -> list[dict[str, Any]]:
    """What label groups read from each row: ``label``, ``category`` (names) and ``attributes``."""
    return [
        {
            "label": rows.label_names[lab] if lab >= 0 else None,
            "category": rows.category_names[cat] if cat >= 0 else None,
            "attributes": attrs,
        }
        for lab, cat, attrs in zip(rows.labels, rows.categories, rows.attributes, strict=True)
    ]


def split_indices(item_ids: Sequence[str], split: SplitSection) -> dict[str, list[int]]:
    from visuray.attributes.data import split_of

    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, item_id in enumerate(item_ids):
        out[split_of(item_id, split.seed, split.val_fraction, split.test_fraction)].append(i)
    return out


def resolve_model_config(
    arch: AttributeArchitecture, specs: Sequence[AttributeGroupSpec], space: LabelSpace
) -> AttributeModelConfig:
    """The buildable model config: the architecture plus each group's labels and depth."""
    depth = {spec.name: spec.depth for spec in specs}
    groups = [GroupHead(name=g.name, labels=list(g.labels), depth=depth[g.name]) for g in space.groups]
    return AttributeModelConfig(**arch.model_dump(), groups=groups)


def label_space_of(model_cfg: AttributeModelConfig) -> LabelSpace:
    return LabelSpace(tuple(LabelGroup(g.name, tuple(g.labels)) for g in model_cfg.groups))


@dataclass
class PreparedCatalog:
    """A catalog in memory with its splits, label space and targets."""

    rows: CatalogRows
    splits: dict[str, list[int]]
    space: LabelSpace
    targets: np.ndarray  # (N, L) for every row
    known: np.ndarray


def prepare_catalog(
    catalog: str,
    options: StorageOptions | None,
    specs: Sequence[AttributeGroupSpec],
    split: SplitSection,
    min_count: int,
    space: LabelSpace | None = None,
) -> PreparedCatalog:
    """Read and split the catalog; the label space comes from the training split unless given."""
    from visuray.catalog.readers import CatalogRows

    rows = CatalogRows(catalog, options)
    meta = row_metadata(rows)
    splits = split_indices(rows.item_ids, split)
    if space is None:
        space = build_label_space([meta[i] for i in splits["train"]], specs, min_count)
    targets, known = encode_targets(meta, specs, space)
    return PreparedCatalog(rows, splits, space, targets, known)


# ----------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker; rank 0's summary comes back as ``Result.return_value``."""
    import ray.train
    import ray.train.torch
    import torch

    from visuray.attributes.data import augment, batch_indices, decode_to_uint8
    from visuray.attributes.fit import build_loss, predict_probabilities, training_step
    from visuray.attributes.metrics import multilabel_report
    from visuray.attributes.model import build_attribute_model
    from visuray.models.weights import prepare_for_training, starting_point
    from visuray.train.common import (
        TrainState,
        decay_param_groups,
        load_train_checkpoint,
        mean_across_ranks,
        save_train_checkpoint,
    )
    from visuray.train.schedules import lr_schedule

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

        save = step % tc.checkpoint_every == 0 or step == tc.steps
        validate = len(val) > 0 and (step % tc.validate_every == 0 or step == tc.steps)
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
        history.append(common.history_entry(metrics))
        if rank == 0:
            log.info(
                "step %d/%d loss %.4f%s%s",
                step,
                tc.steps,
                last_loss,
                common.validation_text(metrics),
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
# Held-out evaluation
# ----------------------------------------------------------------------------------------------------


def wild_editor(spec: str, item_ids: Sequence[str], seed: int) -> Any:
    """``edit(image, i)`` pasting item ``i`` onto a background from ``spec`` ('clutter' or a photo folder)."""
    from visuray.attributes.backgrounds import BackgroundBank

    bank = BackgroundBank() if spec == "clutter" else BackgroundBank.from_folder(spec)
    return lambda img, i: bank.wild(img, item_ids[i], seed)


def evaluate_prepared(
    model: nn.Module,
    data: PreparedCatalog,
    spec: InputSpec,
    min_positives: int,
    wild_backgrounds: str | None = None,
    wild_seed: int = 0,
    batch_size: int = 256,
    roc_png: str | Path | None = None,
    title: str = "attributes: held-out products",
) -> dict[str, Any]:
    """Thresholds on validation, test report (clean and, if asked, wild), ROC figure. Returns
    ``{"thresholds": (L,), "test": report, "test_wild": report | None, "roc_png": path | None,
    "test_scores": (N_test, L)}``."""
    from visuray.attributes.data import decode_to_uint8
    from visuray.attributes.fit import predict_probabilities, thresholds_and_report
    from visuray.attributes.metrics import micro_roc_curve, plot_roc_png, roc_curve

    names = data.space.names

    def scores_of(split: str, edit: Any = None) -> np.ndarray:
        idx = data.splits[split]
        ids = [data.rows.item_ids[i] for i in idx]
        editor = wild_editor(edit, ids, wild_seed) if edit else None
        images = decode_to_uint8([data.rows.image_bytes(i) for i in idx], spec.img_size, editor)
        return predict_probabilities(model, images, spec, batch_size)

    val, test = data.splits["val"], data.splits["test"]
    val_scores, test_scores = scores_of("val"), scores_of("test")
    thresholds, report = thresholds_and_report(
        val_scores, data.targets[val], data.known[val],
        test_scores, data.targets[test], data.known[test], names, min_positives,
    )  # fmt: skip
    wild = None
    curves = {}
    evaluated = [names.index(e["label"]) for e in report["per_label"]]
    if evaluated:
        fpr, tpr = micro_roc_curve(test_scores, data.targets[test], data.known[test], evaluated)
        curves["micro, clean"] = (fpr, tpr, report["micro_auc"])
    if wild_backgrounds:
        wild_scores = scores_of("test", wild_backgrounds)
        wild = thresholds_and_report(
            val_scores, data.targets[val], data.known[val],
            wild_scores, data.targets[test], data.known[test], names, min_positives,
        )[1]  # fmt: skip
        wild["backgrounds"] = wild_backgrounds
        if evaluated:
            fpr, tpr = micro_roc_curve(wild_scores, data.targets[test], data.known[test], evaluated)
            curves["micro, wild backgrounds"] = (fpr, tpr, wild["micro_auc"])
    png = None
    if roc_png is not None and curves:
        known = data.known[test]
        label_curves = {
            names[j]: roc_curve(data.targets[test][known[:, j], j], test_scores[known[:, j], j])
            for j in evaluated
        }
        png = str(plot_roc_png(roc_png, curves, title, label_curves))
    return {
        "thresholds": thresholds,
        "test": report,
        "test_wild": wild,
        "roc_png": png,
        "test_scores": test_scores,
    }


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------


def build_trainer(cfg: AttributeTrainConfig, model_cfg: AttributeModelConfig) -> Any:
    from visuray.storage import absolute_uri
    from visuray.train.ray_job import build_torch_trainer

    job = cfg.model_copy(update={"catalog": absolute_uri(cfg.catalog)})  # workers have another cwd
    loop_config = {"job": job.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json")}
    return build_torch_trainer(train_loop_per_worker, loop_config, cfg)


def summary_metrics(report: dict[str, Any] | None) -> dict[str, Any]:
    if report is None:
        return {}
    return {k: report[k] for k in ("macro_auc", "micro_auc", "map", "num_evaluated")} | {
        "too_few_positives": [e["label"] for e in report["too_few"]]
    }


def precheck(cfg: AttributeTrainConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage, cfg.init_from)


def run_train_attributes(cfg: AttributeTrainConfig) -> dict[str, Any]:
    """Train on Ray Train, evaluate on held-out products, publish the model; return the run's summary."""
    from visuray.attributes.export import save_attribute_model
    from visuray.attributes.model import build_attribute_model
    from visuray.cluster import ensure_ray
    from visuray.models.weights import check_pretrained
    from visuray.train.common import load_train_checkpoint
    from visuray.train.ray_job import fit_checkpointed

    ensure_ray()
    data = prepare_catalog(cfg.catalog, cfg.storage, cfg.labels.groups, cfg.split, cfg.labels.min_count)
    backbone = check_pretrained(cfg.model.backbone, cfg.storage, init_from=cfg.init_from)
    arch = cfg.model.model_copy(update={"backbone": backbone})
    model_cfg = resolve_model_config(arch, cfg.labels.groups, data.space)
    log.info(
        "train_attributes %r: %d labels in groups %s; %d/%d/%d train/val/test products",
        cfg.name,
        len(data.space),
        [g.name for g in data.space.groups],
        *(len(data.splits[s]) for s in ("train", "val", "test")),
    )
    result, summary = fit_checkpointed(build_trainer(cfg, model_cfg), "train_attributes", cfg.name)
    model = build_attribute_model(model_cfg)
    state = load_train_checkpoint(result.checkpoint, model)

    with tempfile.TemporaryDirectory() as tmp:
        evaluation = evaluate_prepared(
            model,
            data,
            model_cfg.backbone.input_spec,
            cfg.eval.min_positives,
            cfg.eval.wild_backgrounds,
            cfg.eval.wild_seed,
            cfg.eval.batch_size,
            roc_png=Path(tmp, "roc.png"),
            title=f"{cfg.name}: held-out products ({model_cfg.head} head)",
        )
        report = {"test": evaluation["test"], "test_wild": evaluation["test_wild"]}
        artifact = save_attribute_model(
            cfg.output,
            model,
            model_cfg,
            evaluation["thresholds"],
            evaluation=report,
            roc_png=evaluation["roc_png"],
            job_cfg=cfg,
            metadata={
                "trained_by": "train_attributes",
                "train_steps": state.step,
                "catalog": cfg.catalog,
                "test/macro_auc": evaluation["test"]["macro_auc"],
                "test/map": evaluation["test"]["map"],
            },
            options=cfg.storage,
        )
    log.info(
        "published attribute model %s: test macro AUC %.4f, mAP %.4f",
        artifact.uri,
        evaluation["test"]["macro_auc"],
        evaluation["test"]["map"],
    )
    return {
        "output": artifact.uri,
        "model_version": artifact.manifest.version,
        "steps": state.step,
        "start_step": summary.get("start_step"),
        "final_loss": summary.get("final_loss", state.loss),
        "history": summary.get("history", []),
        "labels": data.space.names,
        "test": summary_metrics(evaluation["test"]),
        "test_wild": summary_metrics(evaluation["test_wild"]),
        "run_path": result.path,
        "checkpoint": result.checkpoint.path,
    }


def reported_metrics(cfg: AttributeTrainConfig) -> set[str]:
    """What every report of the loop carries (a sweep ranks trials by one of them)."""
    validation = set(VALIDATION_METRICS) if cfg.split.val_fraction > 0 else set()
    return {"train/loss", "train/lr", "train/images_per_s"} | validation
