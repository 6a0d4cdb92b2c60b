"""A real ``leantune train`` process: Ctrl-C saves and exits cleanly; SIGKILL mid-save loses nothing saved."""

from __future__ import annotations

import json
import os
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


def test_ctrl_c_under_torchrun_saves_a_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    config = seqcls_config(out, max_steps=100_000, batch_size=4)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "leantune.cli", "train", str(path)]
    proc = subprocess.Popen(torchrun, env=subprocess_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    # A terminal's Ctrl-C: torchrun and both workers get SIGINT, and torchrun forwards its own copy to the
    # workers a moment later (which must not count as the second Ctrl-C that aborts).
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # The workers save, print and exit 130; torchrun then reports the signal it got itself (exit 1 and a
    # SignalException traceback: torchrun's own behaviour, documented in docs/training.md).
    assert proc.returncode == 1, err[-3000:]
    assert "SignalException" in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.count("Ctrl-C: saving a checkpoint") == 2 and err.count("continue with --resume") == 1, err[-3000:]
    assert "forcefully exiting" not in err, "the workers ended within torchrun's shutdown timeout"
    (checkpoint,) = (out / "checkpoints").iterdir()
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    assert checkpoint.name == f"step-{step:06d}" and step >= 2
    assert [r["step"] for r in map(json.loads, metrics.read_text().splitlines())] == list(range(1, step + 1))

    resumed = subprocess.run([*torchrun, "--resume", "--set", f"training.max_steps={step + 2}"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step}" in resumed.stderr and f"done, {step + 2} steps" in resumed.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_repeat_under_torchrun_is_its_forwarded_copy_however_late(monkeypatch, torchrun):
    from leantune.train.loop import stop_on_sigint

    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), stop_on_sigint() as interrupted:
        assert not interrupted()
        signal.raise_signal(signal.SIGINT)
        assert interrupted()
        if torchrun:
            time.sleep(1.5)  # torchrun's copy, late: still not a second Ctrl-C
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # a real second Ctrl-C aborts
        pytest.fail("the second Ctrl-C should abort")
    assert signal.getsignal(signal.SIGINT) is before
