"""Hardware tier rules and the override."""

from __future__ import annotations

import pytest

from aios_fast.errors import InputError
from aios_fast.hardware import GPUInfo, Tier, classify, detect


@pytest.mark.parametrize("gpus,ram,tier", [
    pytest.param([], 4.0, Tier.LEAF, id="cpu-4GB"),
    pytest.param([], 64.0, Tier.LEAF, id="cpu-64GB"),
    pytest.param([GPUInfo(0, "iGPU", 2.0, "8.6")], 16.0, Tier.LEAF, id="small-gpu"),
    pytest.param([GPUInfo(0, "RTX 4060 Ti", 16.0, "8.9")], 32.0, Tier.HUB, id="16GB-gpu"),
    pytest.param([GPUInfo(0, "RTX 3080", 10.0, "8.6")], 32.0, Tier.HUB, id="10GB-gpu"),
    pytest.param([GPUInfo(0, "RTX 4090", 24.0, "8.9")], 64.0, Tier.SUPER, id="24GB-gpu"),
    pytest.param([GPUInfo(0, "A", 16.0, "8.6"), GPUInfo(1, "B", 16.0, "8.6")], 64.0, Tier.SUPER,
                 id="2x16GB"),
    pytest.param([GPUInfo(0, "H100", 80.0, "9.0")], 128.0, Tier.SUPER, id="h100"),
])
def test_classify(gpus, ram, tier):
    got, reason = classify(gpus, ram)
    assert got is tier
    assert reason


def test_learning_tiers_follow_the_tier():
    leaf = detect(env={"AIOS_FAST_TIER": "leaf"})
    sup = detect(env={"AIOS_FAST_TIER": "super"})
    assert leaf.overridden and "forced by AIOS_FAST_TIER" in leaf.reason
    assert not leaf.may_run("3") and leaf.may_run("1") and leaf.may_run("2")
    assert sup.may_run("3") and sup.may_run("3.5")


def test_bad_override_names_the_variable_and_choices():
    with pytest.raises(InputError, match=r"AIOS_FAST_TIER='giant'.*leaf"):
        detect(env={"AIOS_FAST_TIER": "giant"})


def test_detect_on_this_machine_matches_torch():
    import torch

    p = detect(env={})
    assert bool(p.gpus) == torch.cuda.is_available()
    assert p.ram_gb > 0
