"""DINO pretraining on the session's Ray cluster: the EMA teacher under ZeRO sharding, a run that
publishes a loadable backbone, resuming by run name, and the SSL evaluations on its output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from tests.test_fault_tolerance import KILLED_RUN
from tests.tiny import TINY_VIT
from visuray.config import validate_config
from visuray.evaluation.ssl_eval import SSLEvalOptions
from visuray.index.evaluate import evaluate_ssl_on_catalog
from visuray.models.backbone import create_backbone
from visuray.models.embedding import load_embedding_model
from visuray.models.weights import load_pretrained
from visuray.ssl.config import PretrainConfig
from visuray.ssl.job import run_pretrain
from visuray.ssl.loop import load_teacher_tensors

pytestmark = pytest.mark.ray

# The worker function below lives in this test module, which Ray workers cannot import by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY_MODEL = {
    "backbone": TINY_VIT,
    "out_dim": 64,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
}


def ema_check_loop(config: dict) -> dict:
    """On each worker, for each ZeRO stage: 2 optimizer steps, each followed by the EMA update under test,
    compared with a manual update from independently gathered full student weights."""
    import deepspeed
    import ray.train
    from deepspeed.utils import safe_get_full_fp32_param

    from visuray.ssl.dino import update_teacher
    from visuray.ssl.loop import build_dino_model, build_teacher, dino_param_groups
    from visuray.train.deepspeed_engine import (
        build_engine,
        full_fp32_param,
        load_deepspeed_config,
        resolve_deepspeed_config,
    )

    model_cfg = PretrainConfig.model_validate({"catalog": "-", "output": "-", "model": config["model"]}).model
    rank = ray.train.get_context().get_world_rank()
    out = {}
    for stage in config["stages"]:
        torch.manual_seed(0)
        student = build_dino_model(model_cfg)
        teacher = build_teacher(student, model_cfg)
        optimizer = torch.optim.AdamW(dino_param_groups(student, 0.04), lr=1e-2)
        ds = resolve_deepspeed_config(load_deepspeed_config(stage), 2, 3.0, bf16=False)
        engine = build_engine(student, optimizer, ds)
        params = list(engine.module.named_parameters())
        sharded = [p for _, p in params if hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel]
        max_error = master_error = 0.0
        for step in range(2):
            torch.manual_seed(100 + rank * 10 + step)  # different data on each rank
            crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)]
            loss = engine(crops).logsumexp(-1).mean()
            engine.backward(loss)
            engine.step()
            before = {k: v.clone() for k, v in teacher.named_parameters()}
            # the reference: full student weights gathered by a different path than the code under test
            full = {}
            for name, param in params:
                with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                    full[name] = param.detach().clone().float()
                # full_fp32_param reads an unpartitioned fp32 parameter itself, not the optimizer's master
                # copy: that is exact only if ZeRO wrote the master copy back into it after the step.
                master = safe_get_full_fp32_param(param)
                master_error = max(master_error, float((master - full[name]).abs().max()))
            update_teacher(params, teacher, 0.9, full_fp32_param)
            for name, value in teacher.named_parameters():
                expected = 0.9 * before[name] + 0.1 * full[name]
                max_error = max(max_error, float((value - expected).abs().max()))
            assert any(not torch.equal(before[n], v) for n, v in teacher.named_parameters())
        out[stage] = {
            "max_error": max_error,
            "master_error": master_error,
            "sharded": len(sharded),
            "params": len(params),
        }
    return out if rank == 0 else {}


def test_teacher_ema_is_exact_under_zero_sharding(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ema_check_loop,
        train_loop_config={"model": TINY_MODEL, "stages": [2, 3]},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="ema-check", storage_path=str(tmp_path)),
    )
    result = trainer.fit().return_value
    for stage in (2, 3):
        assert result[stage]["max_error"] < 1e-6, result
        assert result[stage]["master_error"] == 0.0, result
    assert result[3]["sharded"] == result[3]["params"]  # ZeRO-3 really partitioned every parameter
    assert result[2]["sharded"] == 0


def pretrain_config(tmp_path: Path, *overrides: str) -> PretrainConfig:
    data = {
        "name": "test-pretrain",
        "catalog": str(tmp_path / "catalog"),
        "output": str(tmp_path / "model"),
        "run_dir": str(tmp_path / "runs"),
        "model": TINY_MODEL,
        "crops": {"num_local": 2, "local_size": 16},
        "train": {
            "steps": 4,
            "batch_size_per_worker": 4,
            "warmup_steps": 1,
            "warmup_teacher_temp_steps": 2,
            "freeze_last_layer_steps": 1,
            "checkpoint_every": 2,
            "log_every": 1,
            "shuffle_buffer": 8,
        },
        "deepspeed": {"zero_stage": 1},
        "scaling": {"num_workers": 1, "max_failures": 0},
    }
    return validate_config(PretrainConfig, data, "<test>", list(overrides))


@pytest.mark.slow
def test_pretrain_publishes_teacher_backbone_and_resumes_by_name(ray_cluster, killed_pretraining):
    """On the run of tests/test_fault_tolerance.py (its worker killed three times, see conftest.py): the
    model it published, then the run continued by name."""
    run = killed_pretraining
    root, first, steps, every = run.root, run.result, run.steps, run.every
    assert first["steps"] == steps
    # the last attempt's history: every report (one per checkpoint) from its start step to the end
    assert [h["step"] for h in first["history"]] == list(range(first["start_step"] + every, steps + 1, every))

    # the artifact is an embedding model whose embedding is the normalised teacher backbone feature
    model, artifact = load_embedding_model(str(root / "model"))
    meta = artifact.manifest.metadata
    assert meta["trained_by"] == "pretrain" and meta["train_steps"] == steps and meta["embedding_dim"] == 192
    teacher = load_teacher_tensors(first["checkpoint"])
    backbone_cfg = pretrain_config(root).model.backbone
    backbone = create_backbone(backbone_cfg)
    load_pretrained(backbone, backbone_cfg.model_copy(update={"weights": str(root / "model")}))
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, teacher[f"backbone.{name}"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
        torch.testing.assert_close(model(images), torch.nn.functional.normalize(features, dim=-1))

    # the same name and run_dir continue the run from its last checkpoint, here with validation on
    validation = [f"validation.catalog={root / 'catalog'}", "validation.every=1", "validation.ks=[1,3]"]
    second = run_pretrain(
        pretrain_config(root, f"name={KILLED_RUN}", f"train.steps={steps + 2}", *validation)
    )
    assert second["start_step"] == steps and second["steps"] == steps + 2
    assert [h["step"] for h in second["history"]] == [steps + 1, steps + 2]
    assert all({"val/recall@1", "val/recall@3", "val/map@r"} <= set(h) for h in second["history"])
    # validation embeds exactly as the published model does (the teacher's normalised pooled features)
    from visuray.catalog.readers import CatalogRows
    from visuray.evaluation.retrieval import retrieval_metrics
    from visuray.images import to_model_input

    rows = CatalogRows(str(root / "catalog"))
    final, _ = load_embedding_model(str(root / "model"))
    with torch.no_grad():
        vectors = final(to_model_input([rows.image(i) for i in range(len(rows))], 32)).numpy()
    expected = retrieval_metrics(vectors, rows.labels, ks=(1, 3))
    assert second["history"][-1]["val/map@r"] == pytest.approx(expected["map@r"], abs=1e-6)
    assert second["history"][-1]["val/recall@1"] == pytest.approx(expected["recall@1"], abs=1e-6)

    metrics = evaluate_ssl_on_catalog(
        str(root / "model"),
        str(root / "catalog"),
        ("knn", "fewshot", "zeroshot"),
        SSLEvalOptions(k=5, holdout_fraction=1.0, n_way=2, shots=(1,), n_query=2, episodes=20),
    )
    assert metrics["num_items"] == 24 and 0 <= metrics["eval/knn/top1"] <= 1
    assert 0 <= metrics["eval/fewshot/2way1shot/prototype"] <= 1
    assert metrics["eval/zeroshot/num_queries"] == 24
