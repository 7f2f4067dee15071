"""DINO building blocks in one process: loss vs a slow reference, centering, schedules, multi-crop, head,
last-layer freezing, the EMA update, and the student/teacher forward for a ViT and a CNN."""

from __future__ import annotations

import contextlib
import math
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from tests.tiny import TINY_VIT
from visuray.config import ConfigError, validate_config
from visuray.jobspec import load_job_spec
from visuray.ssl.config import PretrainConfig
from visuray.ssl.dino import DINOLoss, batch_center, dino_loss, update_teacher
from visuray.ssl.heads import build_dino_head, is_last_layer_parameter
from visuray.ssl.loop import (
    build_dino_model,
    build_teacher,
    dino_param_groups,
    dino_step,
    set_step_hyperparameters,
)
from visuray.ssl.multicrop import MultiCropAugmentation
from visuray.train.deepspeed_engine import load_deepspeed_config, resolve_deepspeed_config, wants_bf16
from visuray.train.schedules import cosine_schedule, teacher_temperature_schedule

pytestmark = pytest.mark.unit


def reference_dino_loss(student, teacher, center, n_crops, t_s, t_t):
    """Element by element: every image, every (global teacher view, other student view) pair."""
    batch = student.shape[0] // n_crops
    n_global = teacher.shape[0] // batch
    total, pairs = 0.0, 0
    for t in range(n_global):
        for s in range(n_crops):
            if s == t:
                continue
            pair = 0.0
            for b in range(batch):
                z_t = [
                    (teacher[t * batch + b, j].item() - center[0, j].item()) / t_t
                    for j in range(teacher.shape[1])
                ]
                z_s = [student[s * batch + b, j].item() / t_s for j in range(student.shape[1])]
                norm_t = sum(math.exp(v - max(z_t)) for v in z_t)
                log_norm_s = max(z_s) + math.log(sum(math.exp(v - max(z_s)) for v in z_s))
                pair += sum(
                    -(math.exp(zt - max(z_t)) / norm_t) * (zs - log_norm_s)
                    for zt, zs in zip(z_t, z_s, strict=True)
                )
            total += pair / batch
            pairs += 1
    return total / pairs


def test_dino_loss_matches_slow_reference():
    torch.manual_seed(0)
    n_crops, batch, dim = 4, 3, 7
    student = torch.randn(n_crops * batch, dim)
    teacher = torch.randn(2 * batch, dim)
    center = torch.randn(1, dim) * 0.1
    fast = dino_loss(student, teacher, center, n_crops, 0.1, 0.04)
    slow = reference_dino_loss(student, teacher, center, n_crops, 0.1, 0.04)
    assert fast.item() == pytest.approx(slow, rel=1e-5)
    # the student's gradient flows, the teacher's does not
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    dino_loss(student, teacher, center, n_crops, 0.1, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_dino_loss_rejects_mismatched_crops():
    with pytest.raises(
        ValueError, match=r"^teacher rows 5 are not a whole number of the 3-image crops in the student's 12$"
    ):
        dino_loss(torch.randn(12, 7), torch.randn(5, 7), torch.zeros(1, 7), 4, 0.1, 0.04)


def test_dino_loss_with_one_global_crop_matches_slow_reference():
    # One teacher view (e.g. a global crop plus local ones only): every other student view is its pair.
    torch.manual_seed(2)
    student, teacher, center = torch.randn(3 * 2, 5), torch.randn(2, 5), torch.randn(1, 5) * 0.1
    fast = dino_loss(student, teacher, center, 3, 0.1, 0.04)
    assert fast.item() == pytest.approx(reference_dino_loss(student, teacher, center, 3, 0.1, 0.04), rel=1e-5)


def test_batch_center_all_reduces_under_a_process_group():
    # A one-process gloo group takes the collective path that multi-worker training takes.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        teacher = torch.randn(6, 4)
        torch.testing.assert_close(batch_center(teacher), teacher.mean(dim=0, keepdim=True))
    finally:
        dist.destroy_process_group()


def test_centering_is_an_ema_applied_after_the_loss():
    torch.manual_seed(1)
    loss_fn = DINOLoss(out_dim=6, num_crops=3)  # the defaults: student temperature 0.1, centre momentum 0.9
    loss_fn.center.copy_(torch.randn(1, 6))
    old_center = loss_fn.center.clone()
    student, teacher = torch.randn(3 * 4, 6), torch.randn(2 * 4, 6)
    loss = loss_fn(student, teacher, teacher_temp=0.05)
    # the loss used the centre from before this batch
    assert loss.item() == pytest.approx(
        dino_loss(student, teacher, old_center, 3, 0.1, 0.05).item(), rel=1e-6
    )
    expected = 0.9 * old_center + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)
    torch.testing.assert_close(batch_center(teacher), teacher.mean(dim=0, keepdim=True))
    assert "center" in loss_fn.state_dict()  # saved with the training state


def test_centering_stops_one_dimension_from_dominating():
    """A teacher that always fires one logit: after centering the targets are no longer that one-hot."""
    loss_fn = DINOLoss(out_dim=4, num_crops=2, center_momentum=0.5)
    teacher = torch.tensor([[10.0, 0.0, 0.0, 0.0]]).repeat(2, 1)
    for _ in range(30):
        loss_fn.update_center(teacher)
    targets = torch.softmax((teacher - loss_fn.center) / 0.04, dim=-1)
    assert targets[0, 0] < 0.3


def test_cosine_schedule_warmup_and_endpoints():
    values = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.0)
    assert len(values) == 10
    np.testing.assert_allclose(values[:4], [0.0, 0.25, 0.5, 0.75])
    assert values[4] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert np.all(np.diff(values[4:]) < 0)
    # reference cosine at the middle of the decay
    mid = 0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 2 / 5))
    assert values[6] == pytest.approx(mid)
    momentum = cosine_schedule(0.996, 1.0, 100)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0)
    assert np.all(np.diff(momentum) >= 0)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 5, warmup_steps=6)


def test_teacher_temperature_warms_up_then_stays():
    temps = teacher_temperature_schedule(0.04, 0.07, warmup_steps=4, total_steps=8)
    np.testing.assert_allclose(temps, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07, 0.07])
    assert len(teacher_temperature_schedule(0.04, 0.07, warmup_steps=50, total_steps=8)) == 8


def test_multicrop_shapes_and_pickling():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    augment = MultiCropAugmentation(global_size=32, local_size=16, num_local=2)
    crops = pickle.loads(pickle.dumps(augment)).batch(images)
    assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert all(c.dtype == torch.float32 for c in crops)
    assert abs(float(crops[0].mean())) < 3  # normalised, not 0..255
    assert not torch.equal(crops[0], crops[1])  # two different global views
    with pytest.raises(ValueError):
        MultiCropAugmentation(32, 16, 2, global_scale=(1.0, 0.4))


def test_head_last_layer_has_unit_norm_rows_and_learnable_norm_variant():
    torch.manual_seed(0)
    head = build_dino_head(12, 20, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)  # the direction's scale must not matter
    weight = head.last_layer.weight()
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(20))
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 20)
    # the output is the normalised bottleneck times unit rows: |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5
    names = {name for name, _ in head.named_parameters()}
    assert "last_layer.weight_v" in names and "last_layer.weight_g" not in names
    free = build_dino_head(12, 20, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    with torch.no_grad():
        free.last_layer.weight_g.fill_(3.0)
    torch.testing.assert_close(free.last_layer.weight().norm(dim=1), torch.full((20,), 3.0))
    assert is_last_layer_parameter("head.last_layer.weight_v") and not is_last_layer_parameter(
        "head.mlp.0.weight"
    )


def tiny_config(**model: object) -> PretrainConfig:
    data = {
        "catalog": "unused",
        "output": "unused",
        "model": {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, **model},
        "crops": {"num_local": 2, "local_size": 16},
        "train": {"steps": 10, "warmup_steps": 2},
    }
    data["model"].setdefault("backbone", TINY_VIT)
    return validate_config(PretrainConfig, data)


def test_last_layer_stays_frozen_while_the_rest_trains():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_dino_model(cfg.model)
    optimizer = torch.optim.AdamW(dino_param_groups(model, 0.04), lr=1e-2)
    assert sum(bool(g["last_layer"]) for g in optimizer.param_groups) == 1
    frozen_before = model.head.last_layer.weight_v.detach().clone()
    other_before = model.head.mlp[0].weight.detach().clone()
    crops = [
        torch.randn(2, 3, 32, 32),
        torch.randn(2, 3, 32, 32),
        torch.randn(2, 3, 16, 16),
        torch.randn(2, 3, 16, 16),
    ]
    for freeze in (True, True, False):
        set_step_hyperparameters(optimizer.param_groups, lr=1e-2, weight_decay=0.1, freeze_last_layer=freeze)
        loss = model(crops).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if freeze:
            assert torch.equal(model.head.last_layer.weight_v, frozen_before)
    assert not torch.equal(model.head.last_layer.weight_v, frozen_before)
    assert not torch.equal(model.head.mlp[0].weight, other_before)
    decays = {(g["last_layer"], g["decay"]): g["weight_decay"] for g in optimizer.param_groups}
    assert decays[(False, True)] == 0.1 and decays[(False, False)] == 0.0


def test_teacher_ema_matches_manual_update():
    torch.manual_seed(0)
    cfg = tiny_config()
    student = build_dino_model(cfg.model)
    teacher = build_teacher(student, cfg.model)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(student.named_parameters(), teacher, momentum=0.9)
    for name, param in student.named_parameters():
        torch.testing.assert_close(teacher.state_dict()[name], 0.9 * before[name] + 0.1 * param.detach())


def test_teacher_update_skips_frozen_parameters_and_names_a_missing_one():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    def frozen_weight(param: torch.Tensor) -> torch.Tensor | None:
        return None if param is student.weight else param.detach()

    # The frozen weight comes first: the bias after it is still averaged.
    update_teacher(student.named_parameters(), teacher, momentum=0.5, full_param=frozen_weight)
    assert torch.equal(teacher.weight, before["weight"])
    torch.testing.assert_close(teacher.bias, 0.5 * before["bias"] + 0.5 * student.bias.detach())
    extra = [("extra", torch.zeros(1))]
    with pytest.raises(KeyError, match="student parameter 'extra' has no teacher counterpart"):
        update_teacher(extra, teacher, momentum=0.5)


@pytest.mark.parametrize(
    "backbone",
    [
        TINY_VIT,
        {"name": "resnet18", "weights": None, "img_size": 32},
    ],
    ids=["vit", "resnet18"],
)
def test_student_and_teacher_run_on_multicrop_batches(backbone):
    torch.manual_seed(0)
    cfg = tiny_config(backbone=backbone)
    student = build_dino_model(cfg.model)
    teacher = build_teacher(student, cfg.model)
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    loss_fn = DINOLoss(32, num_crops=4)
    with torch.no_grad():
        teacher_out = teacher(crops[:2])
    student_out = student(crops)
    assert student_out.shape == (8, 32) and teacher_out.shape == (4, 32)
    loss = loss_fn(student_out, teacher_out, 0.04)
    loss.backward()
    assert torch.isfinite(loss) and student.backbone.parameters().__next__().grad is not None


def test_config_checks_and_yaml_spec():
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        validate_config(
            PretrainConfig,
            {"catalog": "c", "output": "o", "model": {"backbone": TINY_VIT}, "crops": {"local_size": 20}},
        )
    kind, cfg = load_job_spec("jobs/configs/pretrain_lite0.yaml")
    assert kind.name == "pretrain" and cfg.model.backbone.weights == "efficientnet_lite0"
    assert cfg.crops.num_local == 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_json_per_stage(stage):
    base = load_deepspeed_config(stage)
    assert base["zero_optimization"]["stage"] == stage
    resolved = resolve_deepspeed_config(base, micro_batch_size=8, gradient_clipping=3.0, bf16=False)
    assert resolved["train_micro_batch_size_per_gpu"] == 8 and resolved["gradient_clipping"] == 3.0
    assert resolved["bf16"] == {"enabled": False} and "train_micro_batch_size_per_gpu" not in base


def test_deepspeed_json_for_another_stage_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="stage 2"):
        load_deepspeed_config(3, str(path))


class PlainEngine:
    """What :func:`dino_step` asks of a DeepSpeed engine, for a plain module and optimizer in one process."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def __call__(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.module(crops)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


def squared_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[name] - b[name]).pow(2).sum()) for name in a)


def test_dino_steps_on_a_fixed_batch_lower_the_loss_and_pull_the_teacher_towards_the_student():
    """The loop's own step: a student that does not learn, or a teacher that is not updated, fails."""
    torch.manual_seed(0)
    cfg = tiny_config()
    student = build_dino_model(cfg.model)
    teacher = build_teacher(student, cfg.model)
    start = {name: p.detach().clone() for name, p in student.named_parameters()}
    engine = PlainEngine(student, torch.optim.AdamW(dino_param_groups(student, 0.0), lr=1e-3))
    loss_fn = DINOLoss(cfg.model.out_dim, num_crops=4)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    losses = [
        float(dino_step(engine, teacher, loss_fn, crops, 0.04, 0.9, contextlib.nullcontext(), step))
        for step in range(10)
    ]
    assert losses[-1] < 0.5 * losses[0], losses  # the student learns to match the teacher on this batch
    student_now = {name: p.detach() for name, p in student.named_parameters()}
    teacher_now = {name: p.detach() for name, p in teacher.named_parameters()}
    assert squared_distance(teacher_now, start) > 1e-3  # the teacher moved...
    # ...towards the student, lagging it (an EMA, not a copy)
    assert 1e-3 < squared_distance(teacher_now, student_now) < squared_distance(start, student_now)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_json_with_bf16_on(stage):
    """The GPU precision path, checked on the CPU: bf16 turns DeepSpeed's bf16 section on at every stage,
    and ``precision: auto`` picks it only where CUDA is."""
    resolved = resolve_deepspeed_config(load_deepspeed_config(stage), 8, 3.0, bf16=True)
    assert resolved["bf16"] == {"enabled": True} and resolved["zero_optimization"]["stage"] == stage
    assert "fp16" not in resolved or not resolved["fp16"].get("enabled")
    assert wants_bf16("bf16") and not wants_bf16("fp32")
    assert wants_bf16("auto") == torch.cuda.is_available()
