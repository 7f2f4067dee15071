"""FLOPs and latency: attribute heads at chosen depths of one shared backbone (one forward pass) against
one separate model per group (each its own backbone run to its group's depth), side by side in one run.

    python benchmarks/attributes_shared_pass.py [--depths 4,4,4,2,3,4] [--batch 32] [--repeats 10]

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions: what dominates);
latency is the median over ``--repeats`` timed batches, the shared and separate passes interleaved so
that load on a shared machine hits both alike. Reported as ratios separate / shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from visuray.attributes.config import AttributeModelConfig
    from visuray.attributes.labels import fashion_groups
    from visuray.attributes.model import build_attribute_model, build_separate_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--depths", default="4,4,4,2,3,4", help="per group: gender,category,article_type,colour,usage,season"
    )
    parser.add_argument("--labels-per-group", default="5,18,34,22,4,4")
    parser.add_argument("--vit-depth", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--head", default="attention")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    depths = [int(d) for d in args.depths.split(",")]
    sizes = [int(n) for n in args.labels_per_group.split(",")]
    groups = [
        {"name": spec.name, "labels": [f"{spec.name}={i}" for i in range(n)], "depth": d}
        for spec, n, d in zip(fashion_groups(), sizes, depths, strict=True)
    ]
    cfg = AttributeModelConfig.model_validate(
        {
            "backbone": {"img_size": args.img_size, "patch_size": 8, "depth": args.vit_depth},
            "head": args.head,
            "groups": groups,
        }
    )
    shared = build_attribute_model(cfg).eval()
    separate = [m.eval() for m in build_separate_models(cfg)]
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)

    def run_shared() -> None:
        shared(x)

    def run_separate() -> None:
        for model in separate:
            model(x)

    flops = {}
    with torch.no_grad():
        for name, fn in (("shared", run_shared), ("separate", run_separate)):
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops() / args.batch
        times: dict[str, list[float]] = {"shared": [], "separate": []}
        run_shared(), run_separate()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("shared", run_shared), ("separate", run_separate)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    latency = {name: statistics.median(t) * 1000 / args.batch for name, t in times.items()}
    result = {
        "groups": {g["name"]: g["depth"] for g in groups},
        "batch": args.batch,
        "gflops_per_image": {k: v / 1e9 for k, v in flops.items()},
        "flops_ratio_separate_over_shared": flops["separate"] / flops["shared"],
        "ms_per_image": latency,
        "latency_ratio_separate_over_shared": latency["separate"] / latency["shared"],
        "params_m": {
            "shared": sum(p.numel() for p in shared.parameters()) / 1e6,
            "separate": sum(p.numel() for m in separate for p in m.parameters()) / 1e6,
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
