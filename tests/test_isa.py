"""Probes answer as forced, on any CPU, and go back to the machine's answer afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

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
    w = torch.full((4,), 127, dtype=torch.int8)
    with isa.forced(int8_pairs_saturate=True):
        assert isa.pair_sum_may_saturate(255, w)
        assert not isa.pair_sum_may_saturate(127, w)
    with isa.forced(int8_pairs_saturate=False):
        assert not isa.pair_sum_may_saturate(255, w)


@pytest.mark.parametrize("name", sorted(isa.PROBES))
def test_measured_is_the_machines_answer_whatever_is_forced(name: str) -> None:
    machine = isa.measured(name)
    for answer in (True, False):
        with isa.forced(**{name: answer}):
            assert isa.measured(name) is machine
    with pytest.raises(ValueError, match="unknown probe"):
        isa.measured("no_such_probe")


def test_pair_safe_level_is_the_last_level_that_cannot_saturate() -> None:
    with isa.forced(int8_pairs_saturate=True):
        for w_max in (1, 13, 64, 65, 100, 127):
            level = isa.pair_safe_level(w_max)
            weight = torch.tensor([w_max, -w_max], dtype=torch.int8)
            assert not isa.pair_sum_may_saturate(level, weight)
            assert level == 255 or isa.pair_sum_may_saturate(level + 1, weight)


def test_aten_vector_width_probe_reads_the_dispatch_capability() -> None:
    expected = torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert isa.measured("aten_vectors_are_avx2") is expected


def test_onednn_limited_to_avx2_saturates_on_any_x86_cpu() -> None:
    # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN dispatch its AVX2 kernels, which add u8 x s8 pairs
    # in saturating int16 on every CPU: how a VNNI/AMX machine runs the other CPU's kernels.
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env.pop(isa.FORCE_ENV, None)
    code = "from qalgebra import isa; print(isa.int8_pairs_saturate())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True"]


def test_foreign_answers_name_the_decisions_forced_away_from_this_cpu() -> None:
    own = isa.measured("int8_pairs_saturate")
    with isa.forced(int8_pairs_saturate=own):
        assert isa.foreign_answers() == {}
    with isa.forced(int8_pairs_saturate=not own):
        assert isa.foreign_answers() == {"int8_pairs_saturate": not own}
    # a kernel-fault probe forced either way is not a decision for another CPU
    fault = not isa.measured("qconv_single_column_stride_wrong")
    with isa.forced(qconv_single_column_stride_wrong=fault):
        assert isa.foreign_answers() == {}
