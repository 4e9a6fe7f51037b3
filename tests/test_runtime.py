"""Device choice helpers: the CPU's deterministic mode is switched on and restored, cheaply."""

from __future__ import annotations

import subprocess
import sys

import torch

from tdgen.runtime import deterministic


def test_deterministic_switches_on_for_the_cpu_and_restores():
    was = torch.are_deterministic_algorithms_enabled()
    with deterministic(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == was


def test_deterministic_does_not_import_the_compiler():
    # Importing torch._inductor for its flag cost ~2 s of a CPU `tdgen mesh`.
    code = ("import sys, torch; from tdgen.runtime import deterministic\n"
            "with deterministic(torch.device('cpu')): assert torch.are_deterministic_algorithms_enabled()\n"
            "print('torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
