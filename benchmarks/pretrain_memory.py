"""DINO pretraining memory per worker at ZeRO stages 0-3: what each rank holds, and its peak RSS.

Question: with 2 data-parallel workers, how much memory does each rank of the pretrain job hold for
parameters, gradients and optimizer state at DeepSpeed ZeRO stages 0, 1, 2 and 3, and do stages 2 and 3
reduce it as ZeRO promises?

Protocol
--------
Model: a ViT-S/16 backbone (timm ``vit_small_patch16_224``, 12 blocks, width 384, 21.6M parameters at
64 px) with the job's default DINO head (``out_dim`` 8192, ``hidden_dim`` 2048, ``bottleneck_dim`` 256,
3 layers: 7.6M parameters), fp32 on CPU. To keep it CPU-feasible the images are 64 px (4 x 4 patches) with
2 local crops of 32 px, 8 images per worker per step; memory for weights and states does not depend on
the image size, only activations do.

Each stage runs the job itself: ``visuray.ssl.job.build_trainer(cfg).fit()`` on an embedded Ray
cluster with ``--workers`` (default 2) workers, ``--steps`` (default 3) steps, the catalog streamed
through Ray Data, the stage's ``jobs/configs/deepspeed/zero<N>.json``. The trainer's loop is wrapped (the
driver points ``visuray.ssl.job.train_loop_per_worker`` at a wrapper while ``build_trainer`` runs)
so that the wrapper can patch, inside each worker, ``visuray.train.deepspeed_engine.build_engine`` (to
keep the engine the job builds) and ``visuray.ssl.loop.build_teacher`` (to keep the teacher), then
call the job's unmodified loop. The job has no hook that exposes its engine and teacher (an optional
per-step callback receiving them would make these patches unnecessary).

Measured per rank, when the last step's ``engine.step()`` is entered (after its backward: gradients
are live and the optimizer state exists from the earlier steps):

- an inventory of the tensors the rank holds, de-duplicated by storage (a view into a flat buffer counts
  once, with its whole buffer), classified in this order: ``params`` (the module's parameters, or their
  ZeRO-3 partitions ``ds_tensor``), ``optimizer_state`` (the torch AdamW state: exp_avg, exp_avg_sq),
  ``fp32_master`` (ZeRO's fp32 partitions of the weights: in fp32 training a second copy), ``grads``
  (``param.grad`` and every gradient or reduction buffer of the ZeRO optimizer: attribute names with
  ``grad`` or ``ipg``), ``other`` (any other tensor found on the ZeRO optimizer); plus the ``teacher``
  (a full copy on every rank in this job);
- RSS (``VmRSS``) then, and ``ru_maxrss`` (peak RSS of the worker process) right after that
  ``engine.step()`` returns (the peak over all training steps, before the final checkpoint) and at the
  end of the loop (including the checkpoint save), and RSS before the loop built anything.

Results: ``runs/benchmarks/pretrain_memory/results.json`` and a table on stdout. Memory is not a timing:
run it niced, no lock needed (Ray's workers run at niceness 15 anyway; on a heavily loaded machine a
niced driver can miss Ray's start-up deadline, then run the driver un-niced).

    nice -n 15 .venv/bin/python benchmarks/pretrain_memory.py runs/catalogs/fashion-products

and stage 3 with 10x smaller buckets (a copy of ``zero3.json`` with ``reduce_bucket_size`` and
``stage3_prefetch_bucket_size`` at 5e6):

    .venv/bin/python benchmarks/pretrain_memory.py runs/catalogs/fashion-products --stages 3 \\
        --set deepspeed.config=$PWD/runs/benchmarks/pretrain_memory/zero3-bucket5e6/zero3_bucket5e6.json \\
        --out runs/benchmarks/pretrain_memory/zero3-bucket5e6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "pretrain_lite0.yaml"
# ViT-S/16 with the job's default DINO head; small images and batch keep activations (not measured
# here) small. depth=null takes the architecture's 12 blocks.
DEFAULT_SET = [
    "model.backbone.name=vit_small_patch16_224",
    "model.backbone.patch_size=16",
    "model.backbone.depth=null",
    "model.backbone.img_size=64",
    "model.out_dim=8192",
    "model.hidden_dim=2048",
    "model.bottleneck_dim=256",
    "crops.local_size=32",
    "crops.num_local=2",
    "train.batch_size_per_worker=8",
    "train.warmup_steps=1",
    "train.warmup_teacher_temp_steps=1",
    "train.freeze_last_layer_steps=1",
    "train.tensorboard=false",
]
CATEGORIES = ("params", "optimizer_state", "fp32_master", "grads", "other")
MIB = 2**20


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _tensors(obj: Any, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, Any]]:
    """``(attribute path, tensor)`` for every tensor reachable from ``obj`` through attributes,
    lists, tuples and dicts (and a tensor's ``.grad``), at most ``depth`` levels down."""
    import torch

    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if isinstance(obj, torch.nn.Module | torch.optim.Optimizer):
        return  # modules are counted through their parameters, the inner optimizer through its state
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, list | tuple):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return
    for sub_path, value in items:
        yield from _tensors(value, sub_path, depth - 1, seen)


def engine_inventory(engine: Any, teacher: Any) -> dict[str, Any]:
    """Bytes this rank holds per category (see the module docstring), each storage counted once."""
    import torch

    counted: set[int] = set()
    totals = dict.fromkeys(CATEGORIES, 0)
    by_path: dict[str, int] = {}

    def count(category: str, label: str, tensor: Any) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in counted:
            return
        counted.add(storage.data_ptr())
        totals[category] += storage.nbytes()
        by_path[f"{category}: {label}"] = by_path.get(f"{category}: {label}", 0) + storage.nbytes()

    params = list(engine.module.parameters())
    for param in params:
        count("params", "module parameter", param.data)
        if hasattr(param, "ds_tensor"):  # ZeRO-3: the rank's partition of the parameter
            count("params", "ds_tensor (ZeRO-3 partition)", param.ds_tensor)
    zero_optimizer = engine.optimizer
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    if isinstance(inner, torch.optim.Optimizer):
        for state in inner.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    count("optimizer_state", f"AdamW {key}", value)
    # Gradients of the module's parameters (stage 0 and 1 keep full ones here).
    for param in params:
        if param.grad is not None:
            count("grads", "param.grad", param.grad)
    if zero_optimizer is not inner:  # a ZeRO optimizer wraps the client one: walk its buffers
        found = list(_tensors(zero_optimizer, "zero", 4, set()))
        # The inner optimizer's param groups hold the fp32 partitions the AdamW updates.
        found += [
            (f"inner.param_groups[{i}]", p) for i, g in enumerate(inner.param_groups) for p in g["params"]
        ]
        found += [(f"inner.param_groups[{i}].grad", p.grad) for i, g in enumerate(inner.param_groups)
                  for p in g["params"] if p.grad is not None]  # fmt: skip
        for path, tensor in found:
            name = path.lower()
            # The name of the attribute that holds the tensor, without indices, for the breakdown.
            label = ".".join(part.split("[")[0] for part in path.split(".")[1:]) or path
            if "grad" in name or "ipg" in name:
                count("grads", label, tensor)
            elif "fp32" in name or name.startswith("inner.param_groups"):
                count("fp32_master", label, tensor)
            else:
                count("other", label, tensor)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return {
        "bytes": totals,
        "total_bytes": sum(totals.values()),
        "teacher_bytes": teacher_bytes,
        "parameters": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        "by_attribute": dict(sorted(by_path.items(), key=lambda kv: -kv[1])),
    }


def measured_loop(out_dir: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The Ray Train worker function: keep the engine and teacher, measure, run the job's loop."""
    return lambda config: _measured_loop(config, out_dir)


def _measured_loop(config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    import ray.train

    import visuray.ssl.loop as pretrain

    record: dict[str, Any] = {"rss_before_bytes": rss_bytes(), "peak_rss_before_bytes": peak_rss_bytes()}
    kept: dict[str, Any] = {}
    steps = int(config["job"]["train"]["steps"])
    build_engine, build_teacher = pretrain.build_engine, pretrain.build_teacher

    def keeping_teacher(*args: Any, **kwargs: Any) -> Any:
        kept["teacher"] = build_teacher(*args, **kwargs)
        return kept["teacher"]

    def measuring_engine(*args: Any, **kwargs: Any) -> Any:
        engine = build_engine(*args, **kwargs)
        record["rss_after_engine_bytes"] = rss_bytes()
        step_fn, calls = engine.step, [0]

        def step(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if calls[0] == steps:  # the last step: gradients live, optimizer state from earlier steps
                record["inventory"] = engine_inventory(engine, kept["teacher"])
                record["rss_at_step_bytes"] = rss_bytes()
            out = step_fn(*a, **k)
            if calls[0] == steps:
                record["peak_rss_training_bytes"] = peak_rss_bytes()
            return out

        engine.step = step  # an instance attribute shadows the method the loop calls
        return engine

    # The loop looks these names up in its module when it runs, so patching them there reaches it.
    pretrain.build_engine = measuring_engine
    pretrain.build_teacher = keeping_teacher
    summary = pretrain.train_loop_per_worker(config)
    record["peak_rss_end_bytes"] = peak_rss_bytes()
    context = ray.train.get_context()
    record |= {"rank": context.get_world_rank(), "world_size": context.get_world_size(), "pid": os.getpid()}
    Path(out_dir, f"rank-{record['rank']}.json").write_text(json.dumps(record))
    return summary


def run_stage(config: str, catalog: str, overrides: list[str], stage: int, workers: int, steps: int,
              work: Path) -> list[dict[str, Any]]:  # fmt: skip
    from visuray.config import load_config
    from visuray.ssl.config import PretrainConfig
    from visuray.ssl.job import build_trainer

    out_dir = work / f"zero{stage}"
    out_dir.mkdir(parents=True)
    cfg = load_config(
        PretrainConfig,
        config,
        [
            f"catalog={catalog}",
            *overrides,
            f"name=memory-zero{stage}",
            f"run_dir={work / 'ray-runs'}",
            f"deepspeed.zero_stage={stage}",
            f"scaling.num_workers={workers}",
            "scaling.max_failures=0",
            f"train.steps={steps}",
            f"train.log_every={steps}",
            f"train.checkpoint_every={steps}",
        ],
    )
    from pretrain_throughput import loop_replaced  # a sibling script: benchmarks/ is on sys.path

    with loop_replaced(measured_loop(str(out_dir))):
        trainer = build_trainer(cfg)
    trainer.fit()
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("catalog", help="a published catalog (only its images are read)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", action="append", default=[], help="extra config override key=value")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded cluster")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "pretrain_memory"))
    args = parser.parse_args()

    import ray

    from visuray.cluster import embedded_cluster_options

    overrides = [*DEFAULT_SET, *args.set]
    ray.init(**embedded_cluster_options(args.num_cpus, {"OMP_NUM_THREADS": "1"}))
    stages: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pretrain-memory-") as directory:
            for stage in args.stages:
                records = run_stage(args.config, args.catalog, overrides, stage, args.workers, args.steps,
                                    Path(directory))  # fmt: skip
                stages[str(stage)] = records
                for r in records:
                    inv = r["inventory"]
                    parts = " ".join(f"{k} {v / MIB:.1f}" for k, v in inv["bytes"].items())
                    print(
                        f"[bench] ZeRO-{stage} rank {r['rank']}: {parts} | total {inv['total_bytes'] / MIB:.1f} "
                        f"teacher {inv['teacher_bytes'] / MIB:.1f} MiB | RSS {r['rss_at_step_bytes'] / MIB:.0f}, "
                        f"peak {r['peak_rss_training_bytes'] / MIB:.0f} (end {r['peak_rss_end_bytes'] / MIB:.0f}), "
                        f"before {r['rss_before_bytes'] / MIB:.0f} MiB",
                        flush=True,
                    )
    finally:
        ray.shutdown()

    results = {
        "config": args.config,
        "catalog": args.catalog,
        "overrides": overrides,
        "workers": args.workers,
        "steps": args.steps,
        "stages": stages,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        "\n| ZeRO | rank | "
        + " | ".join(f"{c} (MiB)" for c in CATEGORIES)
        + " | total | teacher | peak RSS |"
    )
    print("|---" * (len(CATEGORIES) + 5) + "|")
    for stage, records in stages.items():
        for r in records:
            inv = r["inventory"]
            cells = " | ".join(f"{inv['bytes'][c] / MIB:.1f}" for c in CATEGORIES)
            print(
                f"| {stage} | {r['rank']} | {cells} | {inv['total_bytes'] / MIB:.1f} | "
                f"{inv['teacher_bytes'] / MIB:.1f} | {r['peak_rss_training_bytes'] / MIB:.0f} |"
            )
    print(f"[bench] wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
