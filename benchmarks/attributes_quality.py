"""Attribute quality on fashion-products: channel-attention head vs the pooled baseline, on clean catalog
photos and on the same held-out products pasted onto wild backgrounds, plus the depth-per-group sweep.

    python benchmarks/attributes_quality.py --catalog runs/catalogs/fashion-products \
        --backgrounds ../shared/data/clothing-small/test --output runs/benchmarks/attributes_quality

What runs (all in this process, same data order, augmentation and initialisation for every model):

1. ``pooled``: every group's head is global average pooling + linear at the last block (the baseline);
2. ``attention``: every group's head is the channel-attention semantic embedding at the last block;
3. ``probe``: one model with an attention head for every group at *every* block (one backbone pass);
   validation AUC per (group, depth) picks each group's depth;
4. ``picked``: the attention model with the picked depths, trained from scratch like (2).

Held-out products (hash split of product ids) are scored clean and composited onto crops of
clothing-small street photos (``visuray.attributes.backgrounds``: near-white pixels connected to the
border are background; the product is pasted over a random crop). Reported: macro/micro AUC and mAP per
model and condition, macro AUC per group, the per-label relative AUC change of attention over the
baseline (mean over labels both evaluate), and the sweep table. Labels with fewer than
``--min-positives`` test positives are listed, not averaged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", default="runs/catalogs/fashion-products")
    parser.add_argument("--backgrounds", default="../shared/data/clothing-small/test",
                        help="folder of background photos, or 'clutter' for generated clutter")  # fmt: skip
    parser.add_argument("--output", default="runs/benchmarks/attributes_quality")
    parser.add_argument("--train-items", type=int, default=3000, help="training products (subset)")
    parser.add_argument("--eval-items", type=int, default=800, help="val and test products each (subset)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-count", type=int, default=20)
    parser.add_argument("--min-positives", type=int, default=5)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def group_macro(report: dict[str, Any], groups: list[str]) -> dict[str, float]:
    out = {}
    for group in groups:
        aucs = [e["auc"] for e in report["per_label"] if e["label"].split("=", 1)[0] == group]
        out[group] = float(np.mean(aucs)) if aucs else float("nan")
    return out


def main() -> None:
    import torch

    from visuray.attributes.config import (
        AttributeArchitecture,
        AttributeModelConfig,
        GroupHead,
        LossSection,
        SplitSection,
    )
    from visuray.attributes.data import decode_to_uint8, prepare_catalog
    from visuray.attributes.evaluate import wild_editor
    from visuray.attributes.fit import fit_in_process, predict_probabilities
    from visuray.attributes.labels import fashion_groups
    from visuray.attributes.metrics import (
        micro_roc_curve,
        multilabel_report,
        plot_roc_png,
        relative_improvement,
    )
    from visuray.attributes.model import build_attribute_model

    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    specs = fashion_groups()
    data = prepare_catalog(args.catalog, None, specs, SplitSection(), args.min_count)
    train = data.splits["train"][: args.train_items]
    val = data.splits["val"][: args.eval_items]
    test = data.splits["test"][: args.eval_items]
    names, groups = data.space.names, [g.name for g in data.space.groups]
    print(f"{len(names)} labels in {groups}; {len(train)}/{len(val)}/{len(test)} train/val/test products")

    def decode(idx: list[int], wild: bool = False) -> torch.Tensor:
        editor = wild_editor(args.backgrounds, [data.rows.item_ids[i] for i in idx], 0) if wild else None
        return decode_to_uint8([data.rows.image_bytes(i) for i in idx], args.img_size, editor)

    t0 = time.monotonic()
    images = {
        "train": decode(train),
        "val": decode(val),
        "test": decode(test),
        "test_wild": decode(test, True),
    }
    print(f"decoded in {time.monotonic() - t0:.0f}s")
    # A few wild examples for the report.
    from torchvision.utils import save_image

    save_image(
        torch.cat([images["test"][:8], images["test_wild"][:8]]).float() / 255,
        out / "wild_examples.png",
        nrow=8,
    )

    arch = AttributeArchitecture.model_validate(
        {"backbone": {"name": "vit_tiny_patch16_224", "img_size": args.img_size, "patch_size": 8,
                      "depth": args.depth}}
    )  # fmt: skip
    loss_cfg = LossSection()

    def train_model(cfg: AttributeModelConfig, targets: np.ndarray, known: np.ndarray) -> tuple[Any, float]:
        torch.manual_seed(0)
        model = build_attribute_model(cfg)
        t = time.monotonic()
        losses = fit_in_process(model, images["train"], targets, known, loss_cfg, args.steps,
                                args.batch_size, args.lr, warmup_steps=args.steps // 10, seed=0)  # fmt: skip
        print(
            f"  trained {cfg.head} in {time.monotonic() - t:.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
        return model, time.monotonic() - t

    def config(head: str, depths: dict[str, int | None]) -> AttributeModelConfig:
        heads = [
            GroupHead(name=g.name, labels=list(g.labels), depth=depths.get(g.name)) for g in data.space.groups
        ]
        return AttributeModelConfig(**arch.model_copy(update={"head": head}).model_dump(), groups=heads)

    def evaluate(model: Any) -> dict[str, Any]:
        result = {}
        for condition in ("test", "test_wild"):
            scores = predict_probabilities(model, images[condition])
            report = multilabel_report(
                scores, data.targets[test], data.known[test], names, args.min_positives
            )
            report["per_group_macro_auc"] = group_macro(report, groups)
            report["scores"] = scores
            result[condition] = report
        return result

    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for head in ("pooled", "attention"):
        print(f"[{head}] all groups at block {args.depth}")
        model, timings[head] = train_model(config(head, {}), data.targets[train], data.known[train])
        results[head] = evaluate(model)

    picked: dict[str, int] = {}
    sweep: dict[str, dict[int, float]] = {}
    if not args.skip_sweep:
        print("[probe] an attention head per group at every block, one backbone pass")
        probe_heads, columns = [], []
        slices = data.space.group_slices()
        for depth in range(1, args.depth + 1):
            for g in data.space.groups:
                probe_heads.append(GroupHead(name=f"{g.name}@{depth}", labels=list(g.labels), depth=depth))
                columns.extend(range(slices[g.name].start, slices[g.name].stop))
        probe_cfg = AttributeModelConfig(**arch.model_dump(), groups=probe_heads)
        probe, timings["probe"] = train_model(
            probe_cfg, data.targets[train][:, columns], data.known[train][:, columns]
        )
        val_scores = predict_probabilities(probe, images["val"])
        probe_names = [f"{n}@{d}" for d in range(1, args.depth + 1) for n in names]
        report = multilabel_report(
            val_scores,
            data.targets[val][:, columns],
            data.known[val][:, columns],
            probe_names,
            args.min_positives,
        )
        for g in groups:
            sweep[g] = {}
            for depth in range(1, args.depth + 1):
                aucs = [e["auc"] for e in report["per_label"] if e["label"].split("=")[0] == g
                        and e["label"].endswith(f"@{depth}")]  # fmt: skip
                sweep[g][depth] = float(np.mean(aucs)) if aucs else float("nan")
            picked[g] = max(sweep[g], key=lambda d: sweep[g][d])
        print(f"  picked depths (validation macro AUC): {picked}")
        print("[picked] attention heads at the picked depths")
        model, timings["picked"] = train_model(
            config("attention", picked), data.targets[train], data.known[train]
        )
        results["picked"] = evaluate(model)

    # ---------------- figures ----------------
    evaluated = [names.index(e["label"]) for e in results["pooled"]["test"]["per_label"]]
    curves = {}
    for key, title in (("pooled", "pooled baseline"), ("attention", "channel attention")):
        for condition, tag in (("test", "clean"), ("test_wild", "wild")):
            r = results[key][condition]
            fpr, tpr = micro_roc_curve(r["scores"], data.targets[test], data.known[test], evaluated)
            curves[f"{title}, {tag}"] = (fpr, tpr, r["micro_auc"])
    roc_png = plot_roc_png(out / "roc.png", curves, "fashion-products attributes, held-out products (micro)")

    summary: dict[str, Any] = {
        "command_args": vars(args),
        "labels": len(names),
        "products": {"train": len(train), "val": len(val), "test": len(test)},
        "backgrounds": args.backgrounds,
        "models": {},
        "relative_auc_attention_vs_pooled": {},
        "depth_sweep_val_macro_auc": sweep,
        "picked_depths": picked,
        "train_seconds": timings,
        "roc_png": str(roc_png),
    }
    for key, r in results.items():
        summary["models"][key] = {
            condition: {k: r[condition][k] for k in ("macro_auc", "micro_auc", "map", "num_evaluated")}
            | {"per_group_macro_auc": r[condition]["per_group_macro_auc"],
               "too_few_positives": [e["label"] for e in r[condition]["too_few"]]}
            for condition in ("test", "test_wild")
        }  # fmt: skip
    for condition in ("test", "test_wild"):
        rel = relative_improvement(results["attention"][condition], results["pooled"][condition])
        summary["relative_auc_attention_vs_pooled"][condition] = rel
        if "picked" in results:
            rel_p = relative_improvement(results["picked"][condition], results["attention"][condition])
            summary.setdefault("relative_auc_picked_vs_last_block", {})[condition] = rel_p
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    for r in results.values():
        for condition in ("test", "test_wild"):
            r[condition].pop("scores")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "reports.json").write_text(json.dumps(results, indent=1, default=float))

    print("\nmodel      condition  macroAUC microAUC   mAP   (labels evaluated)")
    for key in results:
        for condition in ("test", "test_wild"):
            m = summary["models"][key][condition]
            print(
                f"{key:<10} {condition:<10} {m['macro_auc']:.4f}   {m['micro_auc']:.4f}  {m['map']:.4f}  ({m['num_evaluated']})"
            )
    for condition in ("test", "test_wild"):
        rel = summary["relative_auc_attention_vs_pooled"][condition]
        print(f"attention vs pooled, {condition}: mean relative AUC {100 * rel['mean_relative_auc']:+.2f}% "
              f"({rel['labels_improved']}/{rel['labels_compared']} labels improved)")  # fmt: skip
    print(
        "per-group macro AUC (test): "
        + json.dumps(
            {k: summary["models"][k]["test"]["per_group_macro_auc"] for k in results},
            default=lambda x: round(x, 3),
        )
    )
    if sweep:
        print("depth sweep (validation macro AUC):", json.dumps(sweep, default=float))
    print(f"wall time {summary['wall_seconds']}s; figures in {out}")


if __name__ == "__main__":
    main()
