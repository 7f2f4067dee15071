"""DINO pretraining throughput: the Ray Train + DeepSpeed job against a plain PyTorch loop of the same work.

Question: what does running the pretrain job on Ray Train + DeepSpeed cost in images/s against one plain
single-process PyTorch loop of the same model, batch and crops, and what do 2 workers give over 1?

Protocol
--------
Config: ``jobs/configs/pretrain_lite0.yaml`` (ViT-tiny, DINO head, multi-crop, AdamW, ZeRO stage of
the YAML) with the catalog, the step count and ``--set`` overrides applied (by default only the batch:
32 images per worker, each giving 2 global 32 px and 2 local 16 px crops; 2 ViT blocks; a step of about
0.4 CPU-seconds). Final report and checkpoint only at the last step
(``log_every = checkpoint_every = steps``), validation and TensorBoard off.

Three arms, run in turn within each round (baseline, ray-1, ray-2, then again), all in one embedded Ray
cluster started once (so its daemons run beside every arm):

- ``baseline``: a fresh Python process (``--baseline-child``) that builds the job's own pieces
  (``build_dino_model``, ``build_teacher``, ``dino_param_groups``, ``DINOLoss``, ``MultiCropAugmentation``,
  the schedules, ``set_step_hyperparameters``, ``update_teacher``, ``write_heartbeat``) and runs the job's
  per-step sequence without Ray and DeepSpeed: torch AdamW, ``clip_grad_norm_`` at ``train.clip_grad``.
  Its images are the catalog's encoded bytes read into memory before the loop (``read_shard_tables``),
  in a seeded random order; decoding and cropping happen per step as in the job.
- ``ray-1`` / ``ray-2``: the job itself with 1 / 2 workers (``build_trainer(cfg).fit()``: Ray Data
  streaming the catalog, ``train_loop_per_worker``, DeepSpeed engine). The trainer's loop is wrapped (the
  driver points ``visuray.ssl.job.train_loop_per_worker`` at a wrapper for the duration of
  ``build_trainer``) only to set the thread count and to take timestamps; the wrapper calls the job's
  unmodified loop.

What is timed: the steady-state steps. Each arm takes a ``time.perf_counter()`` stamp at every heartbeat
(``write_heartbeat``, called by the job after every step; in the workers by patching that module
function so that it stamps and then writes the file as before). Throughput = images of steps
``warmup+1 .. steps`` / (stamp after step ``steps`` - stamp after step ``warmup``), rank 0's stamps (ranks
move in lockstep). This covers the whole step: fetching the batch (Ray Data iterator or the in-memory
list), decoding, cropping, teacher and student forward, DINO loss, backward, optimizer step, teacher EMA,
heartbeat. It excludes Ray start, dataset set-up, model and engine construction, the warm-up steps and
the final report/checkpoint. Images/s of ray-2 are totals (2 x the per-worker batch per step).

The same wrappers also sum the time spent in each phase (``data``: next batch; ``decode``; ``crop``;
``forward``: student; ``backward``; ``step``; ``ema``: teacher update; ``rest``: teacher forward, loss and
bookkeeping), per steady-state step, to show where any gap comes from.

Threads: every training process calls ``torch.set_num_threads(--threads)`` (default 1) and the cluster's
workers get ``OMP_NUM_THREADS`` to match; each worker reserves 1 logical CPU. So baseline and ray-1 use
one compute thread each and ray-2 two in total, on a 2-core machine. The cluster declares ``--num-cpus``
(default 4) logical CPUs so that the Train controller and Ray Data's read tasks can be scheduled beside
two workers. Niceness: Ray starts its workers at niceness 15 by default (``worker_niceness``), which on
a shared machine hands their CPU to every other process; the cluster is started with
``--worker-niceness`` (default 0, the baseline's) so that both arms compete for the CPU alike; each
arm records its niceness.

Reported per arm and round: images/s, wall and CPU seconds per step (``time.process_time()`` of the
training process, all its threads: far less disturbed by other tenants of a shared machine than wall
time), the phases, the load average before and after. Ratios (ray-1 / baseline, ray-2 / ray-1) are taken
within a round; the median over rounds is reported. Results: ``<out>/results-zero<stage>.json``.

Run (timing: hold the shared lock; the second line repeats it at ZeRO-0):

    flock /tmp/visuray-timing.lock .venv/bin/python benchmarks/pretrain_throughput.py \\
        runs/catalogs/fashion-products --rounds 4 --steps 45 --warmup 10
    ... --rounds 2 --steps 45 --warmup 10 --set train.batch_size_per_worker=32 --set deepspeed.zero_stage=0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "pretrain_lite0.yaml"
# The YAML's model and crops (32 px global, 2 x 16 px local, 2 blocks) at batch 32: about 0.4 CPU-s a step.
DEFAULT_SET = ["train.batch_size_per_worker=32"]
PHASES = ("data", "decode", "crop", "forward", "backward", "step", "ema")


class PhaseClock:
    """Cumulative seconds per phase, and a stamp (with a snapshot of the sums) at every heartbeat."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.stamps: list[tuple[int, float, float, dict[str, float]]] = []

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[phase] += time.perf_counter() - start

        return wrapper

    def timed_iter(self, phase: str, iterator: Iterator[Any]) -> Iterator[Any]:
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.totals[phase] += time.perf_counter() - start
            yield item

    def stamp(self, step: int) -> None:
        # process_time: CPU seconds of the whole process (all its threads), a load-robust companion.
        self.stamps.append((step, time.perf_counter(), time.process_time(), dict(self.totals)))


def steady_state(stamps: list[Any], warmup: int, images_per_step: int) -> dict[str, Any]:
    """Images/s and per-step phase seconds between the stamp after step ``warmup`` and the last one."""
    by_step = {int(step): (float(t), float(cpu), totals) for step, t, cpu, totals in stamps}
    last = max(by_step)
    if warmup not in by_step or last <= warmup:
        raise RuntimeError(f"no stamps for steps {warmup}..{last}")
    (t0, c0, p0), (t1, c1, p1) = by_step[warmup], by_step[last]
    steps = last - warmup
    phases = {k: (p1[k] - p0[k]) / steps for k in PHASES}
    phases["rest"] = (t1 - t0) / steps - sum(phases.values())
    return {
        "steps_timed": steps,
        "seconds": t1 - t0,
        "s_per_step": (t1 - t0) / steps,
        "images_per_s": steps * images_per_step / (t1 - t0),
        "cpu_s_per_step": (c1 - c0) / steps,
        "phase_s_per_step": phases,
    }


def load_pretrain_config(config: str, catalog: str, overrides: list[str]) -> Any:
    from visuray.config import load_config
    from visuray.ssl.config import PretrainConfig

    return load_config(PretrainConfig, config, [f"catalog={catalog}", *overrides])


# ----------------------------------------------------------------------------------------------------
# Baseline: the job's pieces in one plain PyTorch process
# ----------------------------------------------------------------------------------------------------


def run_baseline(cfg: Any, threads: int, heartbeat_dir: str) -> dict[str, Any]:
    """The job's per-step sequence without Ray or DeepSpeed; returns the stamps and the thread count."""
    import random

    import torch

    from visuray.catalog.readers import read_shard_tables
    from visuray.images import decode_image
    from visuray.ssl.dino import DINOLoss, update_teacher
    from visuray.ssl.loop import (
        augmentation_seed,
        build_dino_model,
        build_teacher,
        dino_param_groups,
        dino_schedules,
        set_step_hyperparameters,
        write_heartbeat,
    )
    from visuray.ssl.multicrop import MultiCropAugmentation

    torch.set_num_threads(threads)
    tc, mc = cfg.train, cfg.model
    # The job's device and precision: a GPU when the config asks for one, and then bf16 as the job's
    # DeepSpeed engine runs it ("auto" means bf16 on GPU); the plain loop gets it through autocast.
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    precision = cfg.deepspeed.precision
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(tc.seed)
    student = build_dino_model(mc).to(device)
    teacher = build_teacher(student, mc).to(device)
    optimizer = torch.optim.AdamW(dino_param_groups(student, tc.weight_decay), lr=tc.lr)
    loss_fn = DINOLoss(mc.out_dim, 2 + cfg.crops.num_local, tc.student_temp, tc.center_momentum).to(device)
    batch = tc.batch_size_per_worker
    lr_schedule, wd_schedule, momentum_schedule, temp_schedule = dino_schedules(tc, world_size=1)
    augment = MultiCropAugmentation(
        mc.backbone.img_size,
        cfg.crops.local_size,
        cfg.crops.num_local,
        cfg.crops.global_scale,
        cfg.crops.local_scale,
    )
    encoded = [v.as_py() for t in read_shard_tables(cfg.catalog, cfg.storage, ["image"]) for v in t["image"]]
    random.Random(tc.seed).shuffle(encoded)

    def batches() -> Iterator[list[bytes]]:
        while True:
            for start in range(0, len(encoded) - batch + 1, batch):
                yield encoded[start : start + batch]

    clock = PhaseClock()
    source = clock.timed_iter("data", batches())
    decode = clock.timed("decode", decode_image)
    crop = clock.timed("crop", augment.batch)
    loss_sum = torch.zeros((), device=device)
    student.train()
    for step in range(tc.steps):
        images = [decode(data) for data in next(source)]
        torch.manual_seed(augmentation_seed(tc.seed, 0, step))
        crops = [c.to(device, non_blocking=True) for c in crop(images)]
        set_step_hyperparameters(
            optimizer.param_groups,
            float(lr_schedule[step]),
            float(wd_schedule[step]),
            step < tc.freeze_last_layer_steps,
        )
        with torch.no_grad(), autocast:
            teacher_out = teacher(crops[:2])
        start = time.perf_counter()
        with autocast:
            student_out = student(crops)
        clock.totals["forward"] += time.perf_counter() - start
        loss = loss_fn(student_out.float(), teacher_out.float(), float(temp_schedule[step]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DINO loss is {loss.item()} at step {step}")
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.totals["backward"] += time.perf_counter() - start
        start = time.perf_counter()
        if tc.clip_grad:
            torch.nn.utils.clip_grad_norm_(student.parameters(), tc.clip_grad)
        optimizer.step()
        clock.totals["step"] += time.perf_counter() - start
        start = time.perf_counter()
        update_teacher(student.named_parameters(), teacher, float(momentum_schedule[step]))
        clock.totals["ema"] += time.perf_counter() - start
        loss_sum += loss.detach()
        write_heartbeat(heartbeat_dir, 0, {"rank": 0, "pid": os.getpid(), "step": step + 1})
        clock.stamp(step + 1)
    return {"rank": 0, "threads": torch.get_num_threads(), "nice": os.nice(0), "stamps": clock.stamps}


# ----------------------------------------------------------------------------------------------------
# Ray arm: the job's trainer, its loop wrapped for the stamps
# ----------------------------------------------------------------------------------------------------


def measured_loop(bench: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The Ray Train worker function: set threads, stamp heartbeats and phases, run the job's own loop."""
    return lambda config: _measured_loop(config, bench)


def _measured_loop(config: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import torch

    import visuray.images
    import visuray.ssl.dino
    import visuray.ssl.loop as pretrain
    import visuray.ssl.multicrop

    torch.set_num_threads(int(bench["threads"]))
    clock = PhaseClock()
    write_heartbeat, stream = pretrain.write_heartbeat, pretrain.stream_image_batches
    build_engine, batch_crops = pretrain.build_engine, visuray.ssl.multicrop.MultiCropAugmentation.batch

    def stamped_heartbeat(directory: str, rank: int, record: dict[str, Any]) -> None:
        write_heartbeat(directory, rank, record)
        clock.stamp(int(record["step"]))

    def timed_engine(*args: Any, **kwargs: Any) -> Any:
        engine = build_engine(*args, **kwargs)
        # Instance attributes shadow the methods the loop calls (engine(crops) goes through forward).
        engine.forward = clock.timed("forward", engine.forward)
        engine.backward = clock.timed("backward", engine.backward)
        engine.step = clock.timed("step", engine.step)
        return engine

    pretrain.write_heartbeat = stamped_heartbeat
    pretrain.stream_image_batches = lambda *a, **k: clock.timed_iter("data", stream(*a, **k))
    # The loop's module holds the names it calls: patch them there.
    pretrain.build_engine = timed_engine
    pretrain.decode_image = clock.timed("decode", pretrain.decode_image)
    visuray.ssl.multicrop.MultiCropAugmentation.batch = clock.timed("crop", batch_crops)
    pretrain.update_teacher = clock.timed("ema", pretrain.update_teacher)

    summary = pretrain.train_loop_per_worker(config)
    rank = ray.train.get_context().get_world_rank()
    record = {"rank": rank, "threads": torch.get_num_threads(), "nice": os.nice(0), "stamps": clock.stamps}
    Path(bench["out_dir"], f"rank-{rank}.json").write_text(json.dumps(record))
    return summary


@contextmanager
def loop_replaced(loop: Callable[[dict[str, Any]], Any]) -> Iterator[None]:
    """Point ``build_trainer`` at ``loop`` (it looks the loop up in its module when called)."""
    import visuray.ssl.job as job

    original = job.train_loop_per_worker
    job.train_loop_per_worker = loop
    try:
        yield
    finally:
        job.train_loop_per_worker = original


def run_ray(cfg: Any, workers: int, threads: int, work: Path, tag: str) -> list[dict[str, Any]]:
    from visuray.ssl import job

    out_dir = work / f"{tag}-stamps"
    out_dir.mkdir(parents=True)
    run_cfg = cfg.model_copy(
        update={
            "name": tag,
            "run_dir": str(work / "ray-runs"),
            "scaling": cfg.scaling.model_copy(update={"num_workers": workers, "max_failures": 0}),
            "train": cfg.train.model_copy(update={"heartbeat_dir": str(work / f"{tag}-heartbeats")}),
        }
    )
    with loop_replaced(measured_loop({"threads": threads, "out_dir": str(out_dir)})):
        trainer = job.build_trainer(run_cfg)
    trainer.fit()
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank-*.json"))]


def run_baseline_process(config_path: str, catalog: str, overrides: list[str], threads: int, work: Path,
                         tag: str) -> dict[str, Any]:  # fmt: skip
    out = work / f"{tag}.json"
    cmd = [sys.executable, __file__, catalog, "--config", config_path, "--threads", str(threads),
           "--baseline-child", str(out), "--heartbeat-dir", str(work / f"{tag}-heartbeats")]  # fmt: skip
    for item in overrides:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("catalog", help="a published catalog (only its images are read)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", action="append", default=None, help="config override key=value (repeat)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded cluster")
    parser.add_argument("--worker-niceness", type=int, default=0, help="niceness of the Ray workers")
    parser.add_argument("--arms", nargs="+", default=["baseline", "ray-1", "ray-2"])
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "pretrain_throughput"))
    parser.add_argument("--baseline-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = [*DEFAULT_SET, *(args.set or [])]  # later keys win: --set can change the batch too

    if args.baseline_child:  # the baseline arm, in its own process
        cfg = load_pretrain_config(args.config, args.catalog, overrides)
        record = run_baseline(cfg, args.threads, args.heartbeat_dir)
        Path(args.baseline_child).write_text(json.dumps(record))
        return

    import ray

    from visuray.cluster import embedded_cluster_options

    timing = [f"train.steps={args.steps}", f"train.log_every={args.steps}",
              f"train.checkpoint_every={args.steps}", "train.tensorboard=false"]  # fmt: skip
    overrides += timing
    cfg = load_pretrain_config(args.config, args.catalog, overrides)
    batch = cfg.train.batch_size_per_worker
    print(f"[bench] config overrides {overrides}; ZeRO-{cfg.deepspeed.zero_stage}; load {os.getloadavg()}")
    ray.init(
        **embedded_cluster_options(
            args.num_cpus,
            {"OMP_NUM_THREADS": str(args.threads)},
            _system_config={"worker_niceness": args.worker_niceness},
        )
    )
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pretrain-throughput-") as directory:
            work = Path(directory)
            for round_ in range(args.rounds):
                for arm in args.arms:
                    tag = f"r{round_}-{arm}"
                    load_before = os.getloadavg()
                    if arm == "baseline":
                        records = [run_baseline_process(args.config, args.catalog, overrides, args.threads,
                                                        work, tag)]  # fmt: skip
                        workers = 1
                    else:
                        workers = int(arm.split("-")[1])
                        records = run_ray(cfg, workers, args.threads, work, tag)
                    rank0 = next(r for r in records if r["rank"] == 0)
                    row = {
                        "round": round_,
                        "arm": arm,
                        "workers": workers,
                        "threads": sorted({r["threads"] for r in records}),
                        "nice": sorted({r["nice"] for r in records}),
                        **steady_state(rank0["stamps"], args.warmup, batch * workers),
                        "load_before": load_before,
                        "load_after": os.getloadavg(),
                    }
                    rows.append(row)
                    phases = " ".join(f"{k} {v * 1000:.0f}" for k, v in row["phase_s_per_step"].items())
                    print(
                        f"[bench] round {round_} {arm}: {row['images_per_s']:.1f} img/s "
                        f"({row['s_per_step'] * 1000:.0f} ms/step, {row['cpu_s_per_step'] * 1000:.0f} CPU-ms/step; "
                        f"ms/step: {phases}); threads {row['threads']}, nice {row['nice']}; "
                        f"load {row['load_after'][0]:.2f}",
                        flush=True,
                    )
    finally:
        ray.shutdown()

    def ratio(num: str, den: str, key: str) -> dict[str, Any]:
        # key "images_per_s": wall-time throughput; "cpu_images_per_s": images per CPU-second per process.
        def value(r: dict[str, Any]) -> float:
            if key == "cpu_images_per_s":
                return batch / r["cpu_s_per_step"]
            return r[key]

        by = {(r["round"], r["arm"]): value(r) for r in rows}
        per_round = [
            by[(i, num)] / by[(i, den)] for i in range(args.rounds) if (i, num) in by and (i, den) in by
        ]
        return {"per_round": per_round, "median": statistics.median(per_round) if per_round else None}

    results = {
        "config": str(args.config),
        "catalog": args.catalog,
        "overrides": overrides,
        "zero_stage": cfg.deepspeed.zero_stage,
        "batch_per_worker": batch,
        "crops": 2 + cfg.crops.num_local,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads_per_process": args.threads,
        "num_cpus_logical": args.num_cpus,
        "worker_niceness": args.worker_niceness,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "ratios": {
            "ray-1/baseline": ratio("ray-1", "baseline", "images_per_s"),
            "ray-2/ray-1": ratio("ray-2", "ray-1", "images_per_s"),
            # per worker process: the CPU each spends per image (ray-2: x2 for the pair's ideal speed-up)
            "cpu ray-1/baseline": ratio("ray-1", "baseline", "cpu_images_per_s"),
            "cpu ray-2/ray-1 (per worker)": ratio("ray-2", "ray-1", "cpu_images_per_s"),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"results-zero{cfg.deepspeed.zero_stage}.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["ratios"], indent=2))
    print(f"[bench] wrote {out / name}")


if __name__ == "__main__":
    main()
