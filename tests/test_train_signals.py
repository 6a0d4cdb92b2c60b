"""A real ``leantune train`` process: Ctrl-C saves and exits cleanly; SIGKILL mid-save loses nothing saved."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from leantune.train.checkpoint import DELAY_ENV
from leantune.train.runner import train

from .train_helpers import seqcls_config, single_thread, subprocess_env


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def start(config: dict, env: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "leantune.cli", "train", str(path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition: Callable[[], object], proc: subprocess.Popen, timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the training process ended early (rc {proc.returncode}):\n{proc.communicate()[1]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out waiting for the training process")


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    config = seqcls_config(out, max_steps=100_000)
    proc = start(config, subprocess_env(), tmp_path)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Ctrl-C: saving a checkpoint" in err and "continue with --resume" in err
    (checkpoint,) = (out / "checkpoints").iterdir()
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    assert checkpoint.name == f"step-{step:06d}" and step >= 2
    assert len(metrics.read_text().splitlines()) == step  # one record per step (log_every 1), none lost
    resumed = train(None, config, overrides=[f"training.max_steps={step + 2}"], resume=True)
    assert (resumed.step, resumed.stopped) == (step + 2, False)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    config = seqcls_config(out, max_steps=6, save_every=2)
    proc = start(config, {**subprocess_env(), DELAY_ENV: "3"}, tmp_path)
    checkpoints = out / "checkpoints"
    # The second save has written its adapter and sleeps before the optimizer state: kill it there.
    half = wait_for(lambda: next(checkpoints.glob(".step-000004.tmp-*/adapter/leantune_task.json"), None), proc)
    proc.kill()
    proc.wait(timeout=60)
    assert [p.name for p in checkpoints.glob("step-*")] == ["step-000002"]
    assert not (half.parents[1] / "trainer_state.pt").exists(), "the process died in the middle of the save"
    resumed = train(None, config, resume=True)
    assert (resumed.step, resumed.stopped) == (6, False)
    assert not list(checkpoints.glob(".*")), "the half-written folder is swept away"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
