"""The ``leantune`` command line: method listing, help, and clean errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

import leantune as lt
from leantune.cli import main


def test_methods_lists_every_method_with_fields_defaults_and_flags(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in lt.methods().items():
        assert name in out
        for field, _, default in cls.field_docs():
            assert f"{field}: " in out and repr(default) in out
    lora_block = out.split("lora  [LoRA]", 1)[1].split("\n\n", 1)[0]
    assert "mergeable: yes" in lora_block and "HF PEFT: yes (LORA)" in lora_block and "fused: yes" in lora_block
    assert "fused: no" in out.split("dora  [DoRA]", 1)[1].split("\n\n", 1)[0]
    assert "r: int = 8" in lora_block and "alpha: float = 8.0" in lora_block
    assert "modules_to_save: list[str] | None = None" in lora_block


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "methods" in out


def test_unknown_method_exits_2_with_suggestion(capsys):
    assert main(["demo", "--method", "lorra", "--out", "unused"]) == 2
    captured = capsys.readouterr()
    assert "unknown method 'lorra'" in captured.err and "Did you mean 'lora'" in captured.err
    assert captured.out == ""


def test_unknown_method_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "leantune.cli", "demo", "--method", "LoRAA", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Did you mean 'lora'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--epochs", "-1"], ["demo", "--steps", "3", "--epochs", "2"]])
def test_bad_budget_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
