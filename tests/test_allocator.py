"""Host memory: with ``release_freed_memory`` the heap no longer keeps what a step freed (cdlm/allocator.py)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

STEPS = textwrap.dedent(
    """
    # 40 "steps", each allocating 40 tensors of 4-16 MB (a step's activations) and freeing them in another order,
    # while a few small tensors survive every step; prints the resident memory gained, in MB.
    import random, sys
    from pathlib import Path
    import torch
    from cdlm.allocator import release_freed_memory

    def rss_mb():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) // 1024

    if sys.argv[1] == "release":
        assert release_freed_memory()
    rng, survivors = random.Random(0), []
    base = rss_mb()
    for step in range(40):
        live = [torch.ones(rng.randint(1 << 20, 4 << 20)) for _ in range(40)]
        survivors.append(torch.ones(rng.randint(1000, 50000)))
        rng.shuffle(live)
        del live
    print(rss_mb() - base)
    """
)

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")


def gained_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@needs_glibc
def test_freed_step_memory_goes_back_to_the_system():
    assert gained_mb("keep") > 100  # glibc's default: the heap keeps the freed activations (the symptom)
    assert gained_mb("release") < 32


def test_the_setting_is_a_checked_run_key():
    from cdlm.config import ConfigError, compose

    assert compose([]).release_freed_memory is True
    assert compose(["release_freed_memory=false"]).release_freed_memory is False
    with pytest.raises(ConfigError, match="release_freed_memory"):
        compose(["release_freed_memory=sometimes"])
