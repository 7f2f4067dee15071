"""The command line as a user meets it: help everywhere, clear errors, no partial output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from visuray.cli import build_parser

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent
COMMANDS = [
    "ingest",
    "run",
    "submit",
    "status",
    "logs",
    "stop",
    "list",
    "eval",
    "serve",
    "import-weights",
    "demo",
]


def visuray(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "visuray.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name in COMMANDS:
        assert sub.choices[name].description, name


@pytest.mark.parametrize("command", ["run", "submit", "demo"])
def test_help_runs(command):
    proc = visuray(command, "--help")
    assert proc.returncode == 0 and "usage: visuray" in proc.stdout


def test_bad_key_in_spec_is_a_clear_error(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text((REPO / "jobs/configs/finetune_lite0.yaml").read_text() + "\ntrian:\n  lr: 1\n")
    proc = visuray("run", str(spec))
    assert proc.returncode == 2
    assert "trian: unknown key" in proc.stderr and str(spec) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_override_is_a_clear_error():
    proc = visuray("run", "jobs/configs/finetune_lite0.yaml", "train.steps=lots")
    assert proc.returncode == 2 and "train.steps (command line)" in proc.stderr


def test_print_config_shows_resolved_overrides():
    proc = visuray("run", "jobs/configs/finetune_lite0.yaml", "train.steps=123", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "steps: 123" in proc.stdout


def test_overrides_are_accepted_after_an_option_and_strays_are_still_refused():
    proc = visuray(
        "run", "jobs/configs/finetune_lite0.yaml", "train.steps=123", "--print-config", "train.lr=0.0007"
    )
    assert proc.returncode == 0, proc.stderr
    assert "steps: 123" in proc.stdout and "lr: 0.0007" in proc.stdout
    proc = visuray(
        "run", "jobs/configs/finetune_lite0.yaml", "--print-config", "--no-such-flag", "train.lr=1"
    )
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr
    proc = visuray("demo", "train.lr=1")  # a command without overrides takes none
    assert proc.returncode == 2 and "unrecognized arguments: train.lr=1" in proc.stderr


def test_ingest_of_corrupt_folder_fails_cleanly_without_output(tmp_path):
    src = tmp_path / "images" / "shirts"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"not a jpeg at all")
    (src / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "catalog"
    proc = visuray("ingest", str(tmp_path / "images"), str(out))
    assert proc.returncode != 0
    assert "a.jpg" in proc.stderr + proc.stdout or "no valid image" in (proc.stderr + proc.stdout).lower()
    assert "Traceback" not in proc.stderr
    assert not (out / "LATEST").exists()
    assert not list(out.rglob("MANIFEST.json")) if out.exists() else True


def test_stdlib_platform_is_not_shadowed():
    """`import platform` from the repository root and from the tests is the standard library."""
    import platform

    assert callable(platform.system) and platform.system()
    proc = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == platform.system()
    assert not (REPO / "platform" / "__init__.py").exists()
