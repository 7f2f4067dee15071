"""The ``visuray`` command line.

Local work runs on an embedded Ray cluster (``visuray run``, ``ingest``, ``eval``, ``serve``, ``demo``);
``submit`` / ``status`` / ``logs`` / ``stop`` / ``list`` talk to a cluster through the Ray Jobs API.
Heavy imports happen inside each command so that ``visuray --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from visuray.cluster import apply_ray_env_defaults
from visuray.config import ConfigError, config_to_yaml, validate_config, yaml_load
from visuray.errors import VisurayError

if TYPE_CHECKING:
    from visuray.cluster import StopRequested
    from visuray.serving.args import ServeAppArgs

# What `visuray serve`, `run` and `demo` give Serve's graceful shutdown and the cluster's on SIGINT /
# SIGTERM: inside the 30 s that Kubernetes' default terminationGracePeriodSeconds leaves before SIGKILL.
STOP_TIMEOUT_S = 25.0
VERBOSE_HELP = "debug logging, and Ray's and DeepSpeed's own output (workers' lines) on the console"

log = logging.getLogger("visuray")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------------------------- jobs
def job_script_main(job: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of the thin scripts in ``jobs/``: ``python jobs/<job>.py SPEC.yaml [key=value ...]``.

    A submitted job passes ``--spec-from-env``: the spec, validated before submission, travels in an
    environment variable so that the job does not depend on files outside its working_dir.
    """
    from visuray.cluster import ensure_ray
    from visuray.jobspec import job_kind, load_job_spec
    from visuray.submission import SPEC_ENV

    parser = argparse.ArgumentParser(prog=f"jobs/{job}.py", description=job_kind(job).summary)
    parser.add_argument("spec", nargs="?", help="job spec YAML (omit with --spec-from-env)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    parser.add_argument("--spec-from-env", action="store_true", help=f"read the spec from ${SPEC_ENV}")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.spec_from_env:
            kind = job_kind(job)
            data = yaml_load(os.environ[SPEC_ENV])
            overrides = [args.spec, *args.overrides] if args.spec else args.overrides
            cfg = validate_config(kind.config_model(), data, f"${SPEC_ENV}", overrides)
        else:
            if not args.spec:
                parser.error("a job spec is required")
            kind, cfg = load_job_spec(args.spec, args.overrides)
            if kind.name != job:
                raise ConfigError(f"{args.spec} is a {kind.name!r} spec, not {job!r}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    ensure_ray()
    _print_json(kind.run(cfg))


def cmd_run(args: argparse.Namespace) -> None:
    from visuray.cluster import ensure_ray
    from visuray.jobspec import load_job_spec

    kind, cfg = load_job_spec(args.spec, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg))
        return
    from visuray.cluster import StopRequested, stop_on_signals

    ensure_ray(num_cpus=args.num_cpus)
    name = getattr(cfg, "name", kind.name)
    log.info("running %s job %r on the local Ray cluster", kind.name, name)
    with stop_on_signals():
        try:
            summary = kind.run(cfg)
        except StopRequested as stop:
            rerun = "when run again with the same name and run_dir"
            stop_after_signal(stop, f"{kind.name} job {name!r}", rerun)
            return
    _print_json(summary)


def stop_after_signal(stop: StopRequested, what: str, rerun: str) -> None:
    """After SIGINT / SIGTERM stopped ``what`` (a job, the demo): shut the cluster down (or leave a
    cluster of one's own, ``RAY_ADDRESS``) within :data:`STOP_TIMEOUT_S` and say in one line what was
    stopped and, for a training run, where it resumes from ``rerun`` (how it is started again)."""
    import ray

    from visuray.train.progress import last_run

    shutdown = "the Ray cluster" if not os.environ.get("RAY_ADDRESS") else "the connection"
    run = last_run()
    if run is not None and run.step != run.total_steps:
        at = f"step {run.step}" if run.step is not None else "its start"
        where = f"{run.label} stopped at {at} of {run.total_steps}; it {run.resume_text()} {rerun}"
    else:
        where = f"{what} stopped; nothing half-written was published"
    stop_and_say(
        stop.signal, [(shutdown, ray.shutdown)], lambda took: f" ({shutdown} shut down in {took:.1f} s): {where}",
        unfinished_tail=f": {where}",
    )  # fmt: skip


def stop_and_say(
    received: signal.Signals,
    steps: list[tuple[str, Callable[[], object]]],
    done: Callable[[float], str],
    unfinished_tail: str = "",
) -> None:
    """Run the stop ``steps`` within :data:`STOP_TIMEOUT_S` and say so in one line: ``stopped on <signal>``
    and ``done(seconds)``; when a step did not finish, which ones, and exit 1 at once."""
    from visuray.cluster import stop_within

    took, unfinished = stop_within(steps, STOP_TIMEOUT_S)
    if unfinished:
        print(f"stopped on {received.name} after {took:.0f} s without a clean shutdown of "
              f"{' and '.join(unfinished)}{unfinished_tail}", flush=True)  # fmt: skip
        os._exit(1)  # the stuck shutdown holds locks that a normal interpreter exit would wait on
    print(f"stopped on {received.name}{done(took)}", flush=True)


def cmd_ingest(args: argparse.Namespace) -> None:
    from visuray.catalog.ingest import IngestConfig, run_ingest

    data: dict[str, Any] = {"source": args.source, "output": args.output}
    if args.metadata_csv:
        data["metadata_csv"] = args.metadata_csv
    cfg = validate_config(IngestConfig, data, "<command line>", args.overrides)
    _print_json(run_ingest(cfg))


def cmd_submit(args: argparse.Namespace) -> None:
    from visuray.submission import submit, wait_for

    job_id = submit(args.spec, args.overrides, args.address, args.submission_id, args.with_requirements)
    print(job_id)
    if args.wait:
        status = wait_for(job_id, args.address, timeout=args.timeout)
        print(status)
        if status != "SUCCEEDED":
            raise SystemExit(1)


def cmd_status(args: argparse.Namespace) -> None:
    if args.job_id is None:  # an overview of local runs, artifacts and (if reachable) Serve deployments
        from visuray.status import format_overview, overview

        data = overview(args.root, address=args.address, include_cluster=not args.no_cluster)
        if args.json:
            _print_json(data)
        else:
            print(format_overview(data))
        return
    from visuray.submission import jobs_client

    info = jobs_client(args.address).get_job_info(args.job_id)
    _print_json(
        {
            "job_id": args.job_id,
            "status": str(info.status.value),
            "message": info.message,
            "entrypoint": info.entrypoint,
            "metadata": info.metadata,
            "start_time": info.start_time,
            "end_time": info.end_time,
        }
    )


def cmd_logs(args: argparse.Namespace) -> None:
    from visuray.submission import jobs_client

    client = jobs_client(args.address)
    if not args.follow:
        print(client.get_job_logs(args.job_id), end="")
        return
    import asyncio

    async def follow() -> None:
        async for lines in client.tail_job_logs(args.job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())


def cmd_stop(args: argparse.Namespace) -> None:
    from visuray.submission import jobs_client

    stopped = jobs_client(args.address).stop_job(args.job_id)
    print("stop requested" if stopped else "job was not running")


def cmd_list(args: argparse.Namespace) -> None:
    from visuray.submission import jobs_client

    jobs = jobs_client(args.address).list_jobs()
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        meta = job.metadata or {}
        print(f"{job.submission_id}\t{job.status.value}\t{meta.get('visuray_job', '-')}\t{job.entrypoint}")


def cmd_eval(args: argparse.Namespace) -> None:
    from visuray.cluster import ensure_ray

    ensure_ray(num_cpus=args.num_cpus)
    if args.task == "retrieval":
        from visuray.index.evaluate import evaluate_model_on_catalog

        _print_json(evaluate_model_on_catalog(args.model, args.catalog, ks=tuple(args.k)))
        return
    from visuray.evaluation.ssl_eval import TASKS, SSLEvalOptions
    from visuray.index.evaluate import evaluate_ssl_on_catalog

    opts = SSLEvalOptions(
        k=args.knn_k,
        temperature=args.knn_temperature,
        test_fraction=args.test_fraction,
        holdout_fraction=args.holdout_fraction,
        n_way=args.ways,
        shots=tuple(args.shots),
        n_query=args.queries,
        episodes=args.episodes,
        ks=tuple(args.k),
        seed=args.seed,
    )
    tasks = TASKS if args.task == "ssl" else (args.task,)
    _print_json(evaluate_ssl_on_catalog(args.model, args.catalog, tasks, opts))


def cmd_serve(args: argparse.Namespace) -> None:
    from visuray.cluster import ensure_ray, wait_for_stop_signal
    from visuray.serving import APP_NAME, ServeAppArgs, direct_ingress_urls, start_serve_app

    data: dict[str, Any] = {}
    if args.config:
        from visuray.config import read_yaml

        data = read_yaml(args.config)
    for key in ("model", "index", "catalog"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    app_args = validate_config(ServeAppArgs, data, args.config or "<command line>", args.overrides)
    ensure_ray(num_cpus=serve_cluster_cpus(app_args, args.num_cpus))
    import ray
    from ray import serve

    embedded = not os.environ.get("RAY_ADDRESS")
    problem = app_args.fit_problem(ray.cluster_resources())
    if problem and embedded:
        raise ServeAppDoesNotFitError(problem)  # an embedded cluster never grows: say so now
    if problem:  # a cluster of its own may still grow (an autoscaler): the replicas wait for it
        print(
            f"warning: {problem}; until then its replicas wait to be scheduled", file=sys.stderr, flush=True
        )
    wait = args.wait_for_resources
    url = start_serve_app(
        app_args, host=args.host, port=args.port, schedule_wait_s=wait, timeout_s=max(180.0, wait + 60)
    )
    print(f"serving on {url} (Ctrl-C or SIGTERM to stop)", flush=True)
    for direct in direct_ingress_urls(APP_NAME):  # RAY_SERVE_THROUGHPUT_OPTIMIZED=1: no proxy hop there
        print(f"direct ingress: {direct}", flush=True)
    received = wait_for_stop_signal()
    # Serve's own graceful shutdown: proxies stop taking requests, replicas finish the ones in flight (up to
    # each deployment's graceful_shutdown_timeout_s), then the cluster this command started goes down. On a
    # cluster of its own (RAY_ADDRESS) only this application goes, and the connection.
    steps = [("Serve", serve.shutdown), ("the Ray cluster", ray.shutdown)]
    if not embedded:
        steps = [
            (f"the {APP_NAME!r} application", lambda: serve.delete(APP_NAME)),
            ("the connection", ray.shutdown),
        ]
    done = " and ".join(name for name, _ in steps)
    stop_and_say(received, steps, lambda took: f": requests drained, {done} shut down in {took:.1f} s")


class ServeAppDoesNotFitError(VisurayError):
    """The Serve application's first replicas reserve more than the cluster has."""


def serve_cluster_cpus(app_args: ServeAppArgs, asked: int | None) -> int | None:
    """Logical CPUs for the embedded cluster of ``visuray serve``: ``asked`` (``--num-cpus``), else the
    machine's cores, raised to what the application's first replicas reserve (logical CPUs are
    reservations: the replicas then share the cores, as the demo's do). None where ``RAY_ADDRESS`` names a
    cluster."""
    if asked is not None or os.environ.get("RAY_ADDRESS"):
        return asked
    cores, reserved = os.cpu_count() or 1, app_args.reserved("CPU")
    needed = math.ceil(reserved - 1e-9)
    if needed <= cores:
        return None  # Ray's default: the cores
    print(
        f"the application's first replicas reserve {reserved:g} CPUs: the embedded cluster "
        f"declares {needed} logical CPUs on {cores} cores (--num-cpus sets it)",
        flush=True,
    )
    return needed


def cmd_import_weights(args: argparse.Namespace) -> None:
    from visuray.models.config import BackboneConfig
    from visuray.models.weights import import_weights, resolve_weights
    from visuray.storage import StorageOptions

    data: dict[str, Any] = {"weights": args.source, "weights_layout": args.layout}
    if args.img_size is not None:
        data["img_size"] = args.img_size
    storage = validate_config(StorageOptions, {}, "<command line>", args.storage)
    architecture = args.arch or resolve_weights(args.source, None, args.layout, storage).architecture
    if architecture is None:
        raise ConfigError(f"--arch is needed: {args.source} does not say which timm architecture it is for")
    data["name"] = architecture
    backbone = validate_config(BackboneConfig, data, "<command line>", args.overrides)
    artifact = import_weights(args.output, backbone, args.projection_dim, storage)
    _print_json(
        {
            "output": artifact.uri,
            "model_version": artifact.manifest.version,
            "embedding_dim": artifact.manifest.metadata["embedding_dim"],
            "backbone": architecture,
            "weights": artifact.manifest.metadata["weights_source"],
            "mean": artifact.manifest.metadata["mean"],
            "std": artifact.manifest.metadata["std"],
        }
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from visuray.cluster import StopRequested, stop_on_signals
    from visuray.demo import DemoOptions, run_demo

    opts = DemoOptions(output=args.output, port=args.port, steps=args.steps, num_cpus=args.num_cpus)
    with stop_on_signals():
        try:
            summary = run_demo(opts)
        except StopRequested as stop:
            rerun = f"when `visuray demo --output {args.output}` runs again (finished stages' runs too)"
            stop_after_signal(stop, "the demo", rerun)
            return
    print(f"\nreport: {summary['report']}")


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visuray",
        description="Visuray: train, index and serve visual-search models on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        # Also after the command (`visuray run spec.yaml -v`); SUPPRESS keeps the top-level value otherwise.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        return p

    def add_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    def add_address(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address",
            default=None,
            help="Ray dashboard / Jobs API address (default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)",
        )

    def add_num_cpus(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--num-cpus",
            type=int,
            default=None,
            help="logical CPUs of the embedded local cluster (default: the machine's cores)",
        )

    p = add("ingest", "Turn an image folder (or images + metadata CSV) into a Parquet catalog.", cmd_ingest)
    p.add_argument("source", help="image folder: one sub-folder per class, or the images of --metadata-csv")
    p.add_argument("output", help="catalog URI: a local path or s3://bucket/prefix")
    p.add_argument("--metadata-csv", help="CSV with one row per image (id, image path, labels, text)")
    add_overrides(p)

    p = add("run", "Run a job spec (YAML) on the embedded local Ray cluster.", cmd_run)
    p.add_argument("spec", help="job spec YAML; its `job:` key names the job")
    add_overrides(p)
    add_num_cpus(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = add("submit", "Submit a job spec to a Ray cluster through the Jobs API.", cmd_submit)
    p.add_argument("spec", help="job spec YAML")
    add_overrides(p)
    add_address(p)
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit non-zero if it fails")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to --wait")
    p.add_argument(
        "--with-requirements",
        action="store_true",
        help="install the pinned constraints.txt in the job's runtime env (clusters without the image)",
    )

    p = add(
        "status",
        "Show a submitted job's status; without a job id, an overview of the runs, models, indexes and "
        "catalogs under --root and of the cluster's Serve applications.",
        cmd_status,
    )
    p.add_argument("job_id", nargs="?", default=None)
    add_address(p)
    p.add_argument("--root", default="./runs", help="where to look for artifacts and runs (path or s3://)")
    p.add_argument("--json", action="store_true", help="print the overview as JSON")
    p.add_argument("--no-cluster", action="store_true", help="do not ask a cluster for Serve applications")

    for name, help_, func in [
        ("logs", "Print a submitted job's logs.", cmd_logs),
        ("stop", "Stop a submitted job.", cmd_stop),
    ]:
        p = add(name, help_, func)
        p.add_argument("job_id")
        add_address(p)
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")

    p = add("list", "List the jobs submitted to a cluster.", cmd_list)
    add_address(p)

    p = add(
        "eval",
        "Evaluate a model's embeddings on a labelled catalog: retrieval (Recall@k, MAP@R, leave-one-out, "
        "the default), weighted k-NN accuracy, few-shot episodes or zero-shot retrieval on held-out classes.",
        cmd_eval,
    )
    p.add_argument("--model", required=True, help="model checkpoint URI")
    p.add_argument("--catalog", required=True, help="catalog URI")
    p.add_argument(
        "--task",
        choices=["retrieval", "knn", "fewshot", "zeroshot", "ssl"],
        default="retrieval",
        help="retrieval: all classes, leave-one-out; knn: DINO's weighted k-NN on a per-class item split; "
        "fewshot: N-way K-shot episodes on held-out classes; zeroshot: retrieval on held-out classes only; "
        "ssl: knn + fewshot + zeroshot from one embedding pass",
    )
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="cut-offs for Recall@k")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours for k-NN (DINO: 20)")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="vote temperature (DINO: 0.07)")
    p.add_argument(
        "--test-fraction", type=float, default=0.5, help="share of each class's items tested by k-NN"
    )
    p.add_argument(
        "--holdout-fraction", type=float, default=0.5, help="share of classes held out for fewshot/zeroshot"
    )
    p.add_argument("--ways", type=int, default=5, help="N of N-way episodes")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="K of K-shot episodes")
    p.add_argument("--queries", type=int, default=15, help="query items per class and episode")
    p.add_argument("--episodes", type=int, default=600, help="episodes per shot count (>= 600 for tight CIs)")
    p.add_argument("--seed", type=int, default=0, help="split, held-out classes and episodes")
    add_num_cpus(p)

    p = add("serve", "Start the Serve application (router, embedder, search) and keep it running.", cmd_serve)
    p.add_argument("config", nargs="?", help="YAML with the app arguments (model, index, catalog, ...)")
    p.add_argument("--model", help="model checkpoint URI")
    p.add_argument("--index", help="index URI")
    p.add_argument("--catalog", help="catalog URI")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_num_cpus(p)
    p.add_argument(
        "--wait-for-resources",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long replicas may wait to be scheduled before it gives up, says which and exits 1 (default "
        "30; Serve reports a wait after 30 s at the earliest); raise it where an autoscaler adds nodes",
    )

    p = add(
        "import-weights",
        "Publish a model artifact straight from pretrained weights (pooled features as the embedding, no "
        "training): a built-in name (efficientnet_lite0), a checkpoint file, timm:<name>.<tag> or "
        "hf-hub:<repo> from the local cache. It indexes and serves like a trained model.",
        cmd_import_weights,
    )
    p.add_argument("source", help="weights: efficientnet_lite0, a .safetensors/.pth path or s3:// URI, ...")
    p.add_argument("output", help="model artifact URI to publish into (path or s3://)")
    p.add_argument("--arch", default=None, help="timm architecture (default: what the weights declare)")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "timm", "visuray", "dino", "torchvision", "open_clip", "efficientnet_pytorch"],
        help="the checkpoint's tensor naming (default: recognised from the names)",
    )
    p.add_argument("--img-size", type=int, default=None, help="input size the model records (default 224)")
    p.add_argument(
        "--projection-dim",
        type=int,
        default=None,
        help="embed with a fixed random orthonormal projection to this size (default: the pooled features)",
    )
    p.add_argument(
        "--storage",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="S3 settings (endpoint_url=..., region=...); credentials come from the AWS environment",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="backbone config overrides (mean=[...], std=[...])"
    )

    p = add(
        "demo",
        "The main job: ingest the bundled sample, train, index, serve, query over HTTP, write a report.",
        cmd_demo,
    )
    p.add_argument("--output", default="demo-output", help="folder for the artifacts and report.html")
    p.add_argument(
        "--port", type=int, default=8000, help="HTTP port for the Serve application (0: any free port)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    add_num_cpus(p)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser``'s arguments, with KEY=VALUE overrides also accepted after an option
    (``visuray run spec.yaml --num-cpus 3 train.lr=1e-4``): argparse stops filling a positional list at
    the first option, and its intermixed parsing does not work with subcommands."""
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parse_command_line(parser, argv)
    setup_logging(args.verbose)
    from visuray.train.progress import enable_progress

    enable_progress()  # one display per training run; it also knows where a stopped run resumes
    if not args.verbose:  # Ray's and DeepSpeed's internals stay in Ray's log files
        from visuray.cluster import quiet_ray_console

        quiet_ray_console()
    # Read by Ray when first imported (below, by the command): Ray Serve's throughput-optimised path, a
    # longer wait for a new embedded cluster's dashboard.
    apply_ray_env_defaults()
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except (VisurayError, FileNotFoundError) as exc:
        # Bad input (a folder of corrupt images, a missing artifact): say what is wrong, no traceback
        # unless -v asks for it.
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as exc:
        if args.verbose or not is_training_failure(exc):
            raise
        # A worker's error arrives wrapped in Ray Train's, with both tracebacks: one line instead, and
        # where the whole of it is.
        from visuray.cluster import ray_log_dir
        from visuray.train.progress import training_failure_summary

        print(f"error: training failed: {training_failure_summary(exc)}", file=sys.stderr)
        print(f"(the workers' tracebacks: {ray_log_dir()}/worker-*.err, or rerun with -v)", file=sys.stderr)
        raise SystemExit(1) from None


def is_training_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray Train's report of a failed run (checked without importing Ray)."""
    train = sys.modules.get("ray.train")
    return train is not None and isinstance(exc, train.TrainingFailedError)


if __name__ == "__main__":
    main()
