"""Probes answer as forced, on any CPU, and go back to the machine's answer afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qalgebra import isa


@pytest.mark.parametrize("answer", [True, False])
@pytest.mark.parametrize("name", sorted(isa.PROBES))
def test_forced_probe_answers_as_told_and_restores(name: str, answer: bool) -> None:
    machine = isa.PROBES[name]()
    with isa.forced(**{name: answer}):
        assert isa.PROBES[name]() is answer
        assert isa.probe_answers()[name] is answer
    assert isa.PROBES[name]() is machine


def test_forced_rejects_unknown_probe() -> None:
    with pytest.raises(ValueError, match="unknown probe"), isa.forced(no_such_probe=True):
        pass


def test_environment_forces_a_fresh_process() -> None:
    env = {**os.environ, isa.FORCE_ENV: "int8_pairs_saturate=1,qconv_binary_emits_bf16=0"}
    code = (
        "from qalgebra import isa; a = isa.probe_answers(); "
        "print(a['int8_pairs_saturate'], a['qconv_binary_emits_bf16'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "False"]


def test_pair_sum_follows_the_forced_probe() -> None:
    import torch

    w = torch.full((4,), 127, dtype=torch.int8)
    with isa.forced(int8_pairs_saturate=True):
        assert isa.pair_sum_may_saturate(255, w)
        assert not isa.pair_sum_may_saturate(127, w)
    with isa.forced(int8_pairs_saturate=False):
        assert not isa.pair_sum_may_saturate(255, w)
