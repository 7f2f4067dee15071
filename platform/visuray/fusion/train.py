"""The ``train_fusion`` job: composed-retrieval training on Ray Train, evaluation, export, HTML report.

Driver (:func:`run_train_fusion`): load the catalog's text, build the templated queries, get a tokenizer
(a file, the text-init artifact's, or trained on the catalog's titles, attribute values and the training
queries), then ``TorchTrainer.fit()`` over :func:`train_loop_per_worker`. After the run, the last
checkpoint's weights are published with the tokenizer, the metrics and the report
(:func:`visuray.fusion.model.save_fusion_model`).

Worker loop: decode the images of the subset once (uint8, ``img_size``), restore the latest Ray Train
checkpoint if any, step, report, checkpoint; then rank 0 evaluates on the held-out products and returns
the metrics plus a few ranked lists for the report (``Result.return_value``).

Resuming works as in the other jobs: same ``run_dir`` + ``name`` restores weights, optimizer and step;
batches are a function of (seed, step), so a resumed run sees what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from visuray.config import StrictModel
from visuray.fusion.datasets import (
    TEMPLATED_TEXT_NOTE,
    CatalogItem,
    ComposedQuery,
    catalog_items,
    fashion_products_queries,
    split_held_out,
    subset_items,
)
from visuray.fusion.model import FusionModelConfig
from visuray.images import InputSpec
from visuray.models.config import BackboneConfig
from visuray.storage import StorageOptions
from visuray.train import common
from visuray.train.schedules import lr_schedule

if TYPE_CHECKING:
    import numpy as np
    import ray.train
    import torch
    from torch import nn

    from visuray.fusion.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

CKPT_WEIGHTS = "objective.safetensors"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "train_state.json"


class TokenizerSection(StrictModel):
    """Where the tokenizer comes from."""

    path: str | None = Field(
        None,
        description="a tokenizer.json (path or s3://) to use as is; None trains one on the catalog's text "
        "(or takes text_init_from's, whose token ids the pretrained text encoder knows)",
    )
    vocab_size: int = Field(2000, gt=4, description="WordPiece vocabulary when training; ~2k covers titles")
    min_frequency: int = Field(2, ge=1, description="a piece must occur twice: drops typos and one-off codes")


class DataSection(StrictModel):
    """The composed queries built from the catalog's real attributes (templated text)."""

    kinds: list[Literal["type_colour", "colour_variant"]] = Field(
        default_factory=lambda: ["type_colour", "colour_variant"],
        description="'same article type, in <colour>' and product-line colour variants",
    )
    type_key: str = Field("articleType", description="attribute naming the kind of item (fashion-products)")
    colour_key: str = Field("baseColour", description="attribute naming the colour (fashion-products)")
    max_items: int | None = Field(
        3000, gt=0, description="catalog subset (whole product lines); None uses every item"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="product lines held out: their items are test references and gallery"
    )
    val_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="product lines of the training split held out for validation during training "
        "(val/recall@k, val/fiq_score: what a sweep ranks trials by); 0 trains on all of them",
    )
    type_colour_per_item: int = Field(1, ge=1, description="'in <colour>' queries per reference item")
    seed: int = Field(0, description="subset, split and template choice")


class FusionTrainSection(common.TrainLoopSection):
    steps: int = common.total_steps_field(300)
    batch_size: int = Field(
        64, ge=2, description="queries per worker step: the other 63 targets are each query's negatives"
    )
    lr: float = Field(5e-4, gt=0, description="peak AdamW rate; models start from scratch here")
    composer_lr_scale: float = Field(
        1.0,
        gt=0,
        description="learning-rate multiplier of the composer (the fusion module or baseline head on top of "
        "the encoders); the encoders keep ``lr``",
    )
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="on matrices only, as for ViTs")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up; transformers need a gentle start")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="guards the early, temperature-driven spikes")
    freeze_blocks: int = common.freeze_blocks_field()
    temperature: float = Field(
        0.07, gt=0, description="initial softmax temperature (CLIP's); learned from there"
    )
    learnable_temperature: bool = Field(True, description="False keeps the temperature fixed")
    flip: bool = Field(True, description="random horizontal flips: type and colour do not depend on them")
    checkpoint_every: int = common.checkpoint_every_field(100)
    keep_checkpoints: int = common.keep_checkpoints_field()
    log_every: int = common.log_every_field()
    validate_every: int = Field(
        50,
        ge=1,
        description="steps between val/* reports (also at the last step), when data.val_fraction > 0",
    )
    seed: int = Field(0, description="initialisation and batch order")


class EvalSection(StrictModel):
    ks: list[int] = Field(default_factory=lambda: [1, 10, 50], description="Recall@k cut-offs (Fashion IQ's)")
    exclude_reference: bool = Field(True, description="the reference is never the answer to an edit")
    cfq_candidates_per_group: int = Field(
        2, ge=0, description="CFQ-style labelled candidates per query and label group; 0 skips CFQ metrics"
    )
    report_queries: int = Field(6, ge=0, description="queries shown with their top results in report.html")
    report_top_k: int = Field(8, ge=1, description="results shown per report query")
    batch_size: int = Field(128, ge=1, description="images per forward pass when embedding the gallery")


class FusionTrainConfig(StrictModel):
    """The ``train_fusion`` job: catalog in, fusion model artifact (weights, tokenizer, report) out."""

    job: Literal["train_fusion"] = "train_fusion"
    name: str = common.run_name_field("train-fusion")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    catalog: str = Field(..., description="URI of a published catalog with type and colour attributes")
    output: str = Field(..., description="URI of the fusion model artifact to publish a new version into")
    run_dir: str = common.run_dir_field()
    image_init_from: str | None = Field(
        None,
        description="model artifact whose backbone initialises the image encoder; the same as "
        "model.backbone.weights=<artifact>, and replaces it when set",
    )
    text_init_from: str | None = Field(
        None, description="fusion model artifact whose text encoder (and tokenizer) initialise this one"
    )
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    model: FusionModelConfig = Field(default_factory=FusionModelConfig)
    train: FusionTrainSection = Field(default_factory=FusionTrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    scaling: common.ScalingSection = Field(default_factory=common.ScalingSection)


# ----------------------------------------------------------------------------------------------------
# Data: queries (torch-free) and decoded images
# ----------------------------------------------------------------------------------------------------


@dataclass
class FusionData:
    train_items: list[CatalogItem]
    test_items: list[CatalogItem]
    train_queries: list[ComposedQuery]
    test_queries: list[ComposedQuery]
    val_items: list[CatalogItem] = field(default_factory=list)  # empty without data.val_fraction
    val_queries: list[ComposedQuery] = field(default_factory=list)

    @property
    def gallery_ids(self) -> list[str]:
        return [item.item_id for item in self.test_items]

    def held_out(self, split: str) -> tuple[list[CatalogItem], list[ComposedQuery]]:
        """The items (the gallery) and queries of a held-out split: "test" or "val"."""
        return (self.test_items, self.test_queries) if split == "test" else (self.val_items, self.val_queries)

    def all_ids(self) -> list[str]:
        return [item.item_id for item in self.train_items + self.val_items + self.test_items]


def load_items(
    catalog: str, data: DataSection, options: StorageOptions | None = None
) -> tuple[list[CatalogItem], list[str]]:
    """The catalog's items with a type and a colour, and its titles (tokenizer training text)."""
    from visuray.catalog.readers import load_catalog_frame

    frame = load_catalog_frame(catalog, options, columns=["item_id", "category", "title", "attributes"])
    items = catalog_items(
        list(frame["item_id"]),
        list(frame["category"]),
        list(frame["attributes"]),
        list(frame["title"]),
        data.type_key,
        data.colour_key,
    )
    if not items:
        raise ValueError(
            f"catalog {catalog} has no item with both {data.type_key!r} and {data.colour_key!r} attributes"
        )
    texts = [t for t in frame["title"] if t] + [
        str(v) for attrs in frame["attributes"] for v in attrs.values() if v is not None
    ]
    return items, texts


def build_fusion_data(items: Sequence[CatalogItem], data: DataSection) -> FusionData:
    """Subset, split by product line, and the templated queries of each split (deterministic)."""
    subset = subset_items(items, data.max_items, data.seed)
    train_items, test_items = split_held_out(subset, data.test_fraction, data.seed)
    val_items: list[CatalogItem] = []
    if data.val_fraction > 0:  # whole product lines again, from the training side only
        # Salt seed + 2: subset_items ranks lines by the seed + 1 hash and keeps the lowest, so splitting
        # with that hash again would put every kept line in validation.
        train_items, val_items = split_held_out(train_items, data.val_fraction, data.seed + 2)

    def queries(split: Sequence[CatalogItem], offset: int) -> list[ComposedQuery]:
        return fashion_products_queries(split, data.kinds, data.seed + offset, data.type_colour_per_item)

    fusion_data = FusionData(
        train_items,
        test_items,
        queries(train_items, 0),
        queries(test_items, 1),
        val_items,
        queries(val_items, 2) if val_items else [],
    )
    empty = [
        name
        for name, wanted, found in (
            ("training", True, fusion_data.train_queries),
            ("held-out", True, fusion_data.test_queries),
            ("validation", data.val_fraction > 0, fusion_data.val_queries),
        )
        if wanted and not found
    ]
    if empty:
        raise ValueError(
            f"no queries in the {empty[0]} split: {len(train_items)} train / {len(val_items)} validation / "
            f"{len(test_items)} test items; raise data.max_items"
        )
    return fusion_data


def prepare_tokenizer(cfg: FusionTrainConfig, texts: Sequence[str], data: FusionData) -> TextTokenizer:
    """The tokenizer file if given, else the text-init artifact's, else one trained on catalog text."""
    from visuray.fusion.model import read_tokenizer, resolve_fusion_model
    from visuray.fusion.tokenizer import TextTokenizer, train_tokenizer

    max_length = cfg.model.text.max_length
    if cfg.tokenizer.path:
        return TextTokenizer.load(cfg.tokenizer.path, max_length, cfg.storage)
    if cfg.text_init_from:
        return read_tokenizer(resolve_fusion_model(cfg.text_init_from, cfg.storage), max_length)
    corpus = list(texts) + [q.text for q in data.train_queries]
    return TextTokenizer(
        train_tokenizer(corpus, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency), max_length
    )


class ImageTensorCache:
    """The images of some catalog items, decoded once into a uint8 (N, 3, S, S) tensor.

    Same pixels-to-tensor path as :func:`visuray.images.to_model_input` (shorter side to S, centre crop,
    the model's own normalisation ``spec``), so training, evaluation and the predictor see identical inputs.
    """

    def __init__(
        self,
        catalog: str,
        item_ids: Sequence[str],
        spec: InputSpec,
        options: StorageOptions | None = None,
    ) -> None:
        from visuray.catalog.readers import CatalogRows
        from visuray.images import center_crop_uint8

        rows = CatalogRows(catalog, options)
        row_of = {item_id: i for i, item_id in enumerate(rows.item_ids)}
        unknown = [i for i in item_ids if i not in row_of]
        if unknown:
            raise KeyError(f"{len(unknown)} item id(s) not in catalog {catalog}, e.g. {unknown[:3]}")
        self.ids = list(dict.fromkeys(item_ids))
        self.position = {item_id: i for i, item_id in enumerate(self.ids)}
        self.spec = spec
        self.pixels = center_crop_uint8([rows.image(row_of[i]) for i in self.ids], spec.img_size)

    def batch(self, item_ids: Sequence[str], flip: Any = None) -> torch.Tensor:
        """Normalised float images of ``item_ids``; ``flip`` is a bool tensor of rows to mirror."""
        import torch

        x = self.pixels[[self.position[i] for i in item_ids]]
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return self.spec.normalise(x)


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop (shared by the Ray job and the benchmark)
# ----------------------------------------------------------------------------------------------------


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


def embed_gallery(
    model: nn.Module, cache: ImageTensorCache, item_ids: Sequence[str], batch_size: int
) -> np.ndarray:
    import numpy as np
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(item_ids), batch_size):
            out.append(
                model.encode_images(cache.batch(item_ids[i : i + batch_size]).to(device)).cpu().numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), dtype=np.float32)


def embed_queries(
    model: nn.Module,
    cache: ImageTensorCache,
    tokenizer: TextTokenizer,
    queries: Sequence[ComposedQuery],
    batch_size: int,
) -> np.ndarray:
    import numpy as np
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(queries), batch_size):
            chunk = queries[i : i + batch_size]
            ids, padding = tokenizer([q.text for q in chunk])
            images = cache.batch([q.reference_id for q in chunk]).to(device)
            out.append(model.encode_queries(images, ids.to(device), padding.to(device)).cpu().numpy())
    return np.concatenate(out)


@dataclass
class HeldOutEvaluation:
    """What :func:`evaluate` measured: ``metrics`` keyed ``<split>/<metric>``, the report's
    ``examples``, and per query (in ``queries`` order) the 0-based rank of its first relevant item
    (``inf`` beyond the ranked depth), for query-by-query comparisons of models."""

    metrics: dict[str, float]
    examples: list[dict[str, Any]]
    queries: list[ComposedQuery]
    hit_ranks: Any  # np.ndarray (len(queries),)


def evaluate(
    model: nn.Module,
    cache: ImageTensorCache,
    tokenizer: TextTokenizer,
    data: FusionData,
    ev: EvalSection,
    split: str = "test",
) -> HeldOutEvaluation:
    """Recall@k per category, (R@10+R@50)/2 and CFQ-style metrics on the held-out products; plus the
    first ``ev.report_queries`` queries' top results (for the report) and each query's first-hit rank."""
    import numpy as np

    from visuray.fusion.datasets import labelled_pairs
    from visuray.fusion.metrics import cfq_metrics, composed_recall, first_hit_ranks

    was_training = model.training
    model.eval()
    items, queries = data.held_out(split)
    gallery_ids = [item.item_id for item in items]
    gallery = embed_gallery(model, cache, gallery_ids, ev.batch_size)
    query_vectors = embed_queries(model, cache, tokenizer, queries, ev.batch_size)
    metrics, rankings = composed_recall(
        query_vectors,
        gallery,
        gallery_ids,
        [q.reference_id for q in queries],
        [q.relevant_ids for q in queries],
        [q.category for q in queries],
        ks=ev.ks,
        exclude_reference=ev.exclude_reference,
    )
    for kind in sorted({q.kind for q in queries}):
        rows = [i for i, q in enumerate(queries) if q.kind == kind]
        kind_metrics, _ = composed_recall(
            query_vectors[rows],
            gallery,
            gallery_ids,
            [queries[i].reference_id for i in rows],
            [queries[i].relevant_ids for i in rows],
            [queries[i].category for i in rows],
            ks=ev.ks,
            exclude_reference=ev.exclude_reference,
        )
        metrics.update({f"kind/{kind}/{k}": v for k, v in kind_metrics.items() if "/" not in k})
    if ev.cfq_candidates_per_group > 0:
        pairs = labelled_pairs(queries, items, ev.cfq_candidates_per_group, seed=0)
        if pairs:
            position = {gid: i for i, gid in enumerate(gallery_ids)}
            scores = [
                float(np.dot(query_vectors[p.query_index], gallery[position[p.candidate_id]])) for p in pairs
            ]
            metrics.update(
                cfq_metrics(
                    scores,
                    [p.query_index for p in pairs],
                    [p.caption_match for p in pairs],
                    [p.image_similar for p in pairs],
                )
            )
    examples = [
        {
            "reference_id": queries[i].reference_id,
            "text": queries[i].text,
            "kind": queries[i].kind,
            "relevant_ids": list(queries[i].relevant_ids),
            "top_ids": [gallery_ids[j] for j in rankings[i][: ev.report_top_k] if j >= 0],
        }
        for i in _spread(len(queries), ev.report_queries)
    ]
    model.train(was_training)
    return HeldOutEvaluation(
        metrics={f"{split}/{k}": v for k, v in metrics.items()},
        examples=examples,
        queries=list(queries),
        hit_ranks=first_hit_ranks(rankings, gallery_ids, [q.relevant_ids for q in queries]),
    )


def _spread(count: int, n: int) -> list[int]:
    """Up to ``n`` indices spread over ``range(count)`` (both query kinds, several categories)."""
    if n <= 0 or count == 0:
        return []
    return list(range(0, count, max(1, count // n)))[:n]


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


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
    import ray.train
    import ray.train.torch
    import torch

    from visuray.checkpoint import unwrap_model
    from visuray.fusion.tokenizer import TextTokenizer
    from visuray.models.weights import prepare_for_training
    from visuray.train.common import mean_across_ranks

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
        save = step % tc.checkpoint_every == 0 or step == tc.steps
        validate = bool(data.val_queries) and (step % tc.validate_every == 0 or step == tc.steps)
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
        history.append(common.history_entry(metrics))
        if rank == 0:
            log.info(
                "step %d/%d loss %.4f lr %.2e%s",
                step,
                tc.steps,
                last_loss,
                lr,
                " (checkpoint)" if save else "",
            )
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_train_checkpoint(directory, objective, optimizer, step, last_loss)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
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


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------


def build_trainer(cfg: FusionTrainConfig, tokenizer: TextTokenizer) -> Any:
    from visuray.train.ray_job import build_torch_trainer

    loop_config = {"cfg": cfg.model_dump(mode="json"), "tokenizer": tokenizer.to_json()}
    return build_torch_trainer(train_loop_per_worker, loop_config, cfg)


def with_absolute_inputs(cfg: FusionTrainConfig) -> FusionTrainConfig:
    """A copy of ``cfg`` whose local input paths are absolute (the workers resolve them elsewhere)."""
    from visuray.storage import absolute_uri

    out = cfg.model_copy(deep=True)
    out.catalog = absolute_uri(cfg.catalog)
    out.image_init_from = cfg.image_init_from and absolute_uri(cfg.image_init_from)
    out.text_init_from = cfg.text_init_from and absolute_uri(cfg.text_init_from)
    out.tokenizer.path = cfg.tokenizer.path and absolute_uri(cfg.tokenizer.path)
    return out


def precheck(cfg: FusionTrainConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage, cfg.image_init_from)


def run_train_fusion(cfg: FusionTrainConfig) -> dict[str, Any]:
    """Train on Ray Train, publish the model with tokenizer, metrics and report; return the summary."""
    from visuray.cluster import ensure_ray
    from visuray.fusion.model import save_fusion_model
    from visuray.fusion.report import render_report
    from visuray.models.weights import check_pretrained
    from visuray.train.ray_job import fit_checkpointed

    # Data and tokenizer problems surface here, in the driver, before any worker starts.
    items, texts = load_items(cfg.catalog, cfg.data, cfg.storage)
    data = build_fusion_data(items, cfg.data)
    tokenizer = prepare_tokenizer(cfg, texts, data)
    ensure_ray()
    cfg = with_absolute_inputs(cfg)  # Ray workers do not share the driver's working directory
    cfg.model.backbone = check_pretrained(cfg.model.backbone, cfg.storage, init_from=cfg.image_init_from)
    cfg.model.text.vocab_size = tokenizer.vocab_size  # the embedding table follows the tokenizer
    log.info(
        "train_fusion %r: %s depth %d, %d steps, %d/%d train/test queries -> %s. %s",
        cfg.name,
        cfg.model.fusion,
        cfg.model.fusion_depth,
        cfg.train.steps,
        len(data.train_queries),
        len(data.test_queries),
        cfg.output,
        TEMPLATED_TEXT_NOTE,
    )
    result, summary = fit_checkpointed(build_trainer(cfg, tokenizer), "train_fusion", cfg.name)
    objective = build_objective(cfg)
    state = load_train_checkpoint(result.checkpoint, objective)
    metrics = summary.get("metrics", {})
    report_html = render_report(
        title=f"Composed retrieval: {cfg.model.fusion} (depth {cfg.model.fusion_depth})",
        metrics=metrics,
        examples=summary.get("examples", []),
        images=_example_images(cfg, summary.get("examples", [])),
        notes=[TEMPLATED_TEXT_NOTE, f"{state['step']} steps; catalog {cfg.catalog}"],
    )
    artifact = save_fusion_model(
        cfg.output,
        objective.model,
        cfg.model,
        tokenizer,
        job_cfg=cfg,
        extra_files={
            "metrics.json": json.dumps(metrics, indent=1, sort_keys=True),
            "report.html": report_html,
        },
        metadata={
            "trained_by": "train_fusion",
            "train_steps": state["step"],
            "final_loss": summary.get("final_loss", state["loss"]),
            "catalog": cfg.catalog,
            "text_note": TEMPLATED_TEXT_NOTE,
            **{k: v for k, v in metrics.items() if k.count("/") == 1},
        },
        options=cfg.storage,
    )
    log.info("published fusion model %s (version %s)", artifact.uri, artifact.manifest.version)
    return {
        "output": artifact.uri,
        "model_version": artifact.manifest.version,
        "steps": state["step"],
        "start_step": summary.get("start_step"),
        "final_loss": summary.get("final_loss", state["loss"]),
        "metrics": metrics,
        "history": summary.get("history", []),
        "run_path": result.path,
        "checkpoint": result.checkpoint.path,
        "text_note": TEMPLATED_TEXT_NOTE,
    }


def _example_images(cfg: FusionTrainConfig, examples: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """Encoded images of the report's references and results, read from the catalog."""
    from visuray.catalog.readers import load_catalog_frame

    wanted = {e["reference_id"] for e in examples} | {i for e in examples for i in e["top_ids"]}
    if not wanted:
        return {}
    frame = load_catalog_frame(cfg.catalog, cfg.storage, columns=["item_id", "image"])
    return {i: img for i, img in zip(frame["item_id"], frame["image"], strict=True) if i in wanted}


def validation_metric_names(cfg: FusionTrainConfig) -> set[str]:
    """``val/recall@k`` and (with k = 10 and 50) ``val/fiq_score``, when a validation split exists."""
    if cfg.data.val_fraction <= 0:
        return set()
    names = {f"val/recall@{k}" for k in cfg.eval.ks}
    return names | ({"val/fiq_score"} if {10, 50} <= set(cfg.eval.ks) else set())


def reported_metrics(cfg: FusionTrainConfig) -> set[str]:
    """What the loop reports (a sweep ranks trials by one of them): training metrics at every report,
    validation metrics every ``train.validate_every`` steps."""
    return {"train/loss", "train/lr", "train/temperature", "train/queries_per_s"} | validation_metric_names(
        cfg
    )
