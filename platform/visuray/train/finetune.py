"""Metric fine-tuning of an embedding model on Ray Train + DeepSpeed (triplet with online mining, the
adaptive triplet loss, multi-similarity or contrastive; P x K batches).

The driver (:func:`run_finetune`) builds a ``TorchTrainer`` around :func:`train_loop_per_worker`, a plain
loop that every worker runs: read the catalog (and, for the adaptive triplet loss, derive fine-grained
classes from its titles), build the model (random init, or the backbone of ``init_from``, e.g. a DINO
checkpoint), optionally freeze its first blocks, wrap it in a DeepSpeed engine at ``deepspeed.zero_stage``
(fp32 over gloo on CPU, bf16 on GPU), restore the latest Ray Train checkpoint if the run has one, then
step, log, report and checkpoint. After ``fit()`` the consolidated fp32 weights of the last checkpoint are
published as a model artifact (:func:`visuray.models.embedding.save_model`): what the index and Serve load.

Resuming: a run is identified by ``run_dir`` + ``name``. Running the job again with the same two (for
example with more ``train.steps``) restores Ray Train's checkpoint manager from that folder, and the loop
continues from the latest checkpoint: the engine's weights and optimizer state (ZeRO shards per rank, so
with the same number of workers and ZeRO stage) and the step. The data order is a function of
(seed, step), so a resumed run sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from visuray.config import StrictModel
from visuray.images import InputSpec
from visuray.models.config import EmbeddingModelConfig
from visuray.storage import StorageOptions
from visuray.train import common
from visuray.train.common import (
    CKPT_STATE,
    CKPT_WEIGHTS,
    load_train_checkpoint,
    lr_schedule,
    mean_across_ranks,
)
from visuray.train.common import (  # re-exported: attributes/fit.py imports it from here
    optimizer_param_groups as optimizer_param_groups,
)
from visuray.train.deepspeed_engine import DeepSpeedSection
from visuray.train.validation import ValidationSection, validation_metric_names

if TYPE_CHECKING:
    import ray.train
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# Files of one Ray Train checkpoint (a directory): the consolidated weights (CKPT_WEIGHTS) and the state
# (CKPT_STATE) as in the other jobs' checkpoints (visuray.train.common: load_train_checkpoint reads them), and
CKPT_ENGINE_DIR = "engine"  # DeepSpeed's files: every rank's shards of module and optimizer state


class TrainSection(common.TrainLoopSection):
    """Optimisation, batches and bookkeeping of the loop."""

    steps: int = common.total_steps_field(1000)
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
    single_category_prob: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of batches whose P classes all come from one product category (hard "
        "negatives). 0 = plain P x K; ~0.5 once the embedding separates categories. The category is the "
        "catalog's category column, or, for the adaptive triplet loss, the coarse label",
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
    freeze_blocks: int = common.freeze_blocks_field()
    freeze_backbone_steps: int = Field(
        0,
        ge=0,
        description="train only the embedding head (backbone learning rate 0) for the first N steps, so a "
        "fresh random projection does not send large gradients into a pretrained backbone. 0 = never",
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay: block group i of L (ViT block, CNN stage) gets lr * "
        "decay^(L + 1 - i), the head the full lr. 0.65-0.75 is usual when fine-tuning a pretrained ViT "
        "(BEiT, MAE); None = one lr",
    )
    checkpoint_every: int = common.checkpoint_every_field()
    keep_checkpoints: int = common.keep_checkpoints_field()
    log_every: int = common.log_every_field()
    seed: int = Field(0, description="initialisation and batch order; equal seeds give equal runs")
    data_workers: int = Field(
        2,
        ge=0,
        description="DataLoader processes per training worker that decode and augment images; 0 decodes in "
        "the training process (tests, tiny catalogs)",
    )


class LossSection(StrictModel):
    """Which metric objective, and its knobs (each used only by the losses named in its description)."""

    name: Literal["triplet", "adaptive_triplet", "multi_similarity", "contrastive"] = Field(
        "multi_similarity",
        description="multi_similarity learns from random init on the bundled sample, where batch-hard "
        "triplets collapse (see benchmarks/README.md); triplet/adaptive_triplet suit a pretrained backbone",
    )
    distance: Literal["cosine", "euclidean"] = Field(
        "cosine",
        description="triplet, adaptive_triplet, contrastive: cosine matches the inner-product index the "
        "embeddings are served from (multi_similarity is defined on cosine similarity only)",
    )
    miner: Literal["batch_all", "batch_hard", "semi_hard"] = Field(
        "batch_all",
        description="triplet, adaptive_triplet: in-batch mining. batch_all (averaged over active "
        "triplets) is stable from random init; batch_hard is stronger on a pretrained backbone but can "
        "collapse from scratch; semi_hard sits between",
    )
    margin: float = Field(
        0.2,
        ge=0,
        description="triplet: the margin; adaptive_triplet: the margin between the closest classes. 0.2 "
        "on cosine distance (range [0, 2]) is a common start",
    )
    margin_scale: float = Field(
        0.2,
        ge=0,
        description="adaptive_triplet: margin = margin + margin_scale * semantic distance (in [0, 1]), so "
        "textually unrelated negatives must be up to 0.2 farther than near-duplicates",
    )
    ms_alpha: float = Field(2.0, gt=0, description="multi_similarity: positive-pair scale (the paper's 2)")
    ms_beta: float = Field(50.0, gt=0, description="multi_similarity: negative-pair scale (the paper's 50)")
    ms_base: float = Field(
        0.5, description="multi_similarity: similarity threshold between pulled and pushed pairs (0.5)"
    )
    pos_margin: float = Field(
        0.0, ge=0, description="contrastive: positive pairs closer than this cost nothing (0: pull fully)"
    )
    neg_margin: float = Field(
        0.5, ge=0, description="contrastive: negative pairs farther than this cost nothing; 0.5 on cosine"
    )


class WeakLabelSection(StrictModel):
    """Fine-grained classes from title text, for the adaptive triplet loss (see visuray.weak_labels)."""

    target_size: int = Field(
        16, ge=2, description="intended items per fine class: about 4 P x K draws (K=4) before repeats"
    )
    min_size: int = Field(
        4, ge=1, description="smaller title clusters are merged into the nearest one; K items must exist"
    )


class FinetuneDeepSpeedSection(DeepSpeedSection):
    """DeepSpeed for fine-tuning: ZeRO-1 by default (see the field)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        1,
        description="fine-tuned embedding models are small: ZeRO-1 (optimizer state sharded) already "
        "removes most of the redundant memory, without ZeRO-2/3's extra communication per step",
    )


class FinetuneConfig(StrictModel):
    """The ``finetune`` job: catalog in, model artifact out."""

    job: Literal["finetune"] = "finetune"
    name: str = common.run_name_field("finetune")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    catalog: str = Field(..., description="URI of a published catalog with labels (see the ingest job)")
    output: str = Field(..., description="URI of the model artifact to publish a new version into")
    run_dir: str = common.run_dir_field()
    init_from: str | None = Field(
        None,
        description="model artifact whose backbone initialises this one (e.g. a DINO-continued model); "
        "the same as model.backbone.weights=<artifact>, and replaces it when set",
    )
    model: EmbeddingModelConfig = Field(default_factory=EmbeddingModelConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    loss: LossSection = Field(default_factory=LossSection)
    weak_labels: WeakLabelSection = Field(default_factory=WeakLabelSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    deepspeed: FinetuneDeepSpeedSection = Field(default_factory=FinetuneDeepSpeedSection)
    scaling: common.ScalingSection = Field(default_factory=common.ScalingSection)


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------


def train_transform(spec: InputSpec) -> Any:
    """Light augmentation for metric learning: the same product under crops and flips stays the same.
    Normalised with the model's own statistics (``spec``), as every later stage feeds it."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(spec.img_size, scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


def build_loss(cfg: LossSection, semantic_distances: Any = None) -> nn.Module:
    """The metric loss named by ``cfg`` (``semantic_distances``: the fine classes' (C, C), for ATL)."""
    from visuray.losses import AdaptiveTripletLoss, ContrastiveLoss, MultiSimilarityLoss, TripletMarginLoss
    from visuray.losses.mining import build_miner

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


@dataclass
class TrainingLabels:
    """What the sampler and the loss see: one class and one category per catalog row."""

    labels: list[int]
    categories: list[int]
    semantic_distances: Any = None  # (C, C) numpy array for the adaptive triplet loss
    names: list[str] | None = None


def training_labels(dataset: Any, cfg: FinetuneConfig) -> TrainingLabels:
    """The catalog's labels and categories, or, for the adaptive triplet loss, fine-grained classes from
    the titles within each coarse label (which then plays the category)."""
    if cfg.loss.name != "adaptive_triplet":
        return TrainingLabels(list(dataset.labels), list(dataset.categories))
    from visuray.weak_labels import fine_grained_classes

    weak = fine_grained_classes(
        dataset.labels,
        dataset.titles,
        dataset.label_names,
        target_size=cfg.weak_labels.target_size,
        min_size=cfg.weak_labels.min_size,
        seed=cfg.train.seed,
    )
    return TrainingLabels(weak.labels.tolist(), list(dataset.labels), weak.semantic_distances, weak.names)


def build_sampler(labels: TrainingLabels, tc: TrainSection, rank: int, world_size: int) -> Any:
    from visuray.samplers import CategoryBalancedSampler, PKSampler

    if tc.single_category_prob > 0:
        return CategoryBalancedSampler(
            labels.labels, labels.categories, tc.p, tc.k, tc.single_category_prob, seed=tc.seed, rank=rank,
            world_size=world_size,
        )  # fmt: skip
    return PKSampler(labels.labels, tc.p, tc.k, seed=tc.seed, rank=rank, world_size=world_size)


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
    """AdamW groups: decay on matrices only (as :func:`optimizer_param_groups`), split by depth when
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
    from visuray.models.embedding import build_embedding_model
    from visuray.models.weights import prepare_for_training, starting_point
    from visuray.train.deepspeed_engine import (
        build_engine,
        engine_dtype,
        resolve_deepspeed_config,
        wants_bf16,
    )
    from visuray.train.deepspeed_engine import (
        optimizer_param_groups as engine_param_groups,
    )
    from visuray.train.validation import ValidationSet

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
        history.append(common.history_entry(metrics))
        if rank == 0:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.1f img/s%s%s",
                step,
                tc.steps,
                last_loss,
                lr,
                metrics["train/images_per_s"],
                common.validation_text(metrics),
                " (checkpoint)" if save else "",
            )
        if save:
            saved = {
                "step": step,
                "loss": last_loss,
                "world_size": world_size,
                "zero_stage": cfg.deepspeed.zero_stage,
            }
            with tempfile.TemporaryDirectory() as directory:
                save_finetune_checkpoint(directory, engine, saved, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        loss_sum, loss_count, started = torch.zeros((), device=device), 0, time.monotonic()

    return {"start_step": start_step, "steps": step, "final_loss": last_loss, "history": history}


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------


def build_trainer(cfg: FinetuneConfig) -> Any:
    from visuray.train.deepspeed_engine import load_deepspeed_config
    from visuray.train.ray_job import build_torch_trainer

    # The DeepSpeed JSON is read here, on the driver, where the repository's jobs/configs is at hand.
    ds_base = load_deepspeed_config(cfg.deepspeed.zero_stage, cfg.deepspeed.config)
    loop_config = {"job": cfg.model_dump(mode="json"), "deepspeed": ds_base}
    return build_torch_trainer(train_loop_per_worker, loop_config, cfg)


def with_checked_weights(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with its backbone's starting weights checked and their preprocessing recorded
    (:func:`visuray.models.weights.check_pretrained`); ``init_from`` becomes the weights."""
    from visuray.models.weights import check_pretrained

    backbone = check_pretrained(cfg.model.backbone, cfg.storage, init_from=cfg.init_from)
    model = cfg.model.model_copy(update={"backbone": backbone})
    return cfg.model_copy(update={"model": model})


def precheck(cfg: FinetuneConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage, cfg.init_from)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train on Ray Train, publish the final weights as a model artifact, return the run's summary."""
    from visuray.cluster import ensure_ray
    from visuray.models.embedding import build_embedding_model, save_model
    from visuray.train.ray_job import fit_checkpointed

    ensure_ray()
    cfg = with_checked_weights(cfg)
    log.info("finetune %r: %d steps on %s -> %s", cfg.name, cfg.train.steps, cfg.catalog, cfg.output)
    result, summary = fit_checkpointed(build_trainer(cfg), "finetune", cfg.name)
    # The summary comes from rank 0's return value, with the checkpoint's own state as the fallback.
    model = build_embedding_model(cfg.model)
    state = load_train_checkpoint(result.checkpoint, model)
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
            "loss": cfg.loss.name,
            "miner": cfg.loss.miner if cfg.loss.name in ("triplet", "adaptive_triplet") else None,
            "init_from": cfg.init_from,
            "zero_stage": cfg.deepspeed.zero_stage,
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


def reported_metrics(cfg: FinetuneConfig) -> set[str]:
    """What the loop reports (a sweep ranks trials by one of them): the training metrics at every report,
    and ``val/*`` every ``validation.every`` steps when a validation catalog is set."""
    return {"train/loss", "train/lr", "train/tuples", "train/images_per_s"} | validation_metric_names(
        cfg.validation
    )
