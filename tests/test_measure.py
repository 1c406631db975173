"""The runtime measurement helpers the demo and the benchmark report with."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qalgebra.measure import paired_ratio, timed_samples


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    samples = {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 2.0]}
    # Per round: 2, 4, 3 -> 3; the ratio of the medians (4 / 1) would be 4.
    assert paired_ratio(samples, "a", "b") == 3.0
    assert paired_ratio(samples, "a", "missing") is None


def test_modules_take_turns_in_a_rotating_order_on_fresh_inputs() -> None:
    calls: list[str] = []
    seen: list[torch.Tensor] = []

    def recorder(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            seen.append(x)
            return x.add_(1)  # writes its input: the next call must not see it

        return run

    x = torch.zeros(3)
    samples = timed_samples({"p": recorder("p"), "q": recorder("q")}, (x,), runs=4, warmup=2)
    assert {name: len(times) for name, times in samples.items()} == {"p": 4, "q": 4}
    assert all(t >= 0 for times in samples.values() for t in times)
    assert len(calls) == 2 * (4 + 2)
    firsts = calls[0::2]
    assert firsts == ["p", "q", "p", "q", "p", "q"]  # each round starts with the next module
    assert torch.equal(x, torch.zeros(3)) and all(s is not x for s in seen)
