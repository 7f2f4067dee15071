"""The demo's jobs: the shipped specs in ``jobs/configs/`` with the demo's overrides (where its artifacts go,
and the CPU-sized budget), so that what the demo runs is what a platform team submits.

Budget, on 2 cores (every model starts from the bundled ImageNet EfficientNet-Lite0):

- fine-tuning: ``finetune_lite0.yaml`` as shipped (160 px, multi-similarity, lr 3e-4, the stem and first
  three stages frozen; BatchNorm statistics held), ``--steps`` steps (100 by default: ~1.5 minutes). On
  held-out clothing-small photos the query top-1 went from 0.63 (pretrained, random projection) to 0.85;
- DINO: ``pretrain_lite0.yaml`` (128 px global crops, two 64 px local crops) continued from the same
  weights for 0.2 of the fine-tuning steps, one worker: a demonstration of the job, not enough steps to
  move the pretrained features much;
- attributes: the architecture of ``train_attributes_lite0.yaml`` (128 px) with all but the last two stages
  frozen, trained in this process for 0.6 of the fine-tuning steps (a Ray Train run's start-up would cost
  more than the training);
- composed retrieval: ``train_fusion_lite0.yaml`` made smaller (MAAF depth 1, a one-block text encoder) on
  the sample's class and estimated colour, 0.6 of the fine-tuning steps at batch 32.

Two CPUs for each training worker: Ray gives a worker as many torch threads as CPUs (one would halve the
step rate), and the demo's cluster has 4 logical CPUs on the 2 cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visuray.jobspec import load_job_spec

SPECS = Path(__file__).resolve().parents[3] / "jobs" / "configs"

DEMO_STEPS = 100
DINO_STEPS_PER_FINETUNE_STEP = 0.2
ATTRIBUTE_STEPS_PER_FINETUNE_STEP = 0.6
FUSION_STEPS_PER_FINETUNE_STEP = 0.6
ATTRIBUTE_FROZEN_BLOCKS = 5  # of Lite0's 7 stages: the heads and the last two stages train
ATTRIBUTE_BATCH = 32


def scaled_steps(finetune_steps: int, fraction: float, minimum: int = 4) -> int:
    """Steps of a secondary stage tied to ``--steps`` (the fine-tuning steps), at least ``minimum``."""
    return max(minimum, round(finetune_steps * fraction))


def demo_spec(file: str, overrides: Sequence[str]) -> BaseModel:
    """The validated config of ``jobs/configs/<file>`` with ``overrides`` (dotted ``key=value``)."""
    _, cfg = load_job_spec(SPECS / file, overrides)
    return cfg


def run_overrides(name: str, catalog: str, output: str, run_dir: str) -> list[str]:
    """Where a training job of the demo reads and writes."""
    return [f"name={name}", f"catalog={catalog}", f"output={output}", f"run_dir={run_dir}"]


def ingest_spec(source: str, metadata_csv: str, output: str) -> Any:
    """The bundled sample with its metadata CSV: class, and a colour estimated from the pixels. The sample
    has no product titles: the id (class/file stem) stands in for one, so that every photo is its own
    product line, as it is (and the report has something to show as a title)."""
    return demo_spec(
        "ingest_clothing_small.yaml",
        [
            f"source={source}", f"metadata_csv={metadata_csv}", f"output={output}", "id_column=id",
            "image_column=image", "label_column=class", "category_column=class", "title_column=id",
        ],
    )  # fmt: skip


def pretrain_spec(steps: int, paths: list[str]) -> Any:
    return demo_spec(
        "pretrain_lite0.yaml",
        [
            *paths, f"train.steps={steps}", f"train.warmup_steps={max(steps // 10, 1)}",
            f"train.warmup_teacher_temp_steps={max(steps // 2, 1)}",
            # The head starts random: its last layer stays fixed while the rest finds its footing.
            f"train.freeze_last_layer_steps={max(steps // 4, 1)}", f"train.checkpoint_every={steps}",
            "train.tensorboard=false",
            # One worker with one CPU: with two per worker, the Ray Data read tasks that feed it starve.
            "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        ],
    )  # fmt: skip


def finetune_spec(steps: int, paths: list[str]) -> Any:
    return demo_spec(
        "finetune_lite0.yaml",
        [
            *paths, f"train.steps={steps}", f"train.warmup_steps={min(10, steps // 5)}",
            f"train.checkpoint_every={max(steps // 2, 1)}", "train.data_workers=0",
            "scaling.cpus_per_worker=2",
        ],
    )  # fmt: skip


def attribute_spec(steps: int, catalog: str, output: str) -> Any:
    """The attribute job's architecture and loss; the demo trains them in process (``demo.attributes``)."""
    return demo_spec(
        "train_attributes_lite0.yaml",
        [
            f"catalog={catalog}", f"output={output}", "model.embed_dim=64", f"train.steps={steps}",
            f"train.batch_size={ATTRIBUTE_BATCH}", f"train.warmup_steps={min(10, steps // 5)}",
            f"train.freeze_blocks={ATTRIBUTE_FROZEN_BLOCKS}",
        ],
    )  # fmt: skip


def fusion_spec(steps: int, paths: list[str]) -> Any:
    """MAAF depth 1 over the pretrained image encoder's tokens (4 x 4 at 128 px, all but its last two
    stages frozen) and a one-block text encoder, on "same kind, in <colour>" queries templated from the
    class and the estimated colour."""
    return demo_spec(
        "train_fusion_lite0.yaml",
        [
            *paths, "tokenizer.vocab_size=500", "tokenizer.min_frequency=1", "data.kinds=[type_colour]",
            "data.type_key=class", "data.colour_key=colour", "data.max_items=null", "data.test_fraction=0.2",
            "data.type_colour_per_item=2", "model.text.width=64", "model.text.depth=1", "model.text.heads=2",
            "model.text.max_length=16", "model.fusion_depth=1", "model.fusion_width=64",
            "model.fusion_heads=2", "model.embed_dim=64", f"train.steps={steps}", "train.batch_size=32",
            "train.lr=1e-3", f"train.warmup_steps={max(steps // 10, 1)}", f"train.checkpoint_every={steps}",
            "train.log_every=20", "train.keep_checkpoints=1", "eval.ks=[1,5,10]", "eval.report_queries=4",
            "eval.report_top_k=5", "eval.batch_size=64", "scaling.cpus_per_worker=2",
        ],
    )  # fmt: skip
