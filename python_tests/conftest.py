"""Test-suite settings, applied before peft_kernels loads its libraries.

* PEFT_KERNELS_POISON_OUTPUTS=1: every op output starts as NaN / 0xA5, so unwritten elements fail tests.
* CUDASIM_MODE=fiber: the CUDA kernels run by the CPU executor use one OS thread with a fiber per CUDA
  thread (~20x faster than an OS thread each); the sanitizer tests run the OS-thread mode in subprocesses.
"""

import os

os.environ.setdefault("PEFT_KERNELS_POISON_OUTPUTS", "1")
os.environ.setdefault("CUDASIM_MODE", "fiber")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_kernels  # noqa: E402

INFO = peft_kernels.build_info()


class Backend:
    """Where an op runs: `ops` is the torch.ops namespace, `device` where its tensors live."""

    def __init__(self, name: str, ops, device: str):
        self.name, self.ops, self.device = name, ops, device

    def __repr__(self) -> str:
        return self.name


def _backends() -> list:
    params = [pytest.param(Backend("cpu", torch.ops.peft_kernels, "cpu"), id="cpu")]
    # The CUDA kernel sources executed on the CPU. Only an explicit PEFT_KERNELS_CUDASIM=0 build lacks them.
    params.append(
        pytest.param(
            Backend("cudasim", getattr(torch.ops, "peft_kernels_sim", None), "cpu"),
            id="cudasim",
            marks=pytest.mark.skipif(not INFO["cudasim"], reason="built with PEFT_KERNELS_CUDASIM=0"),
        )
    )
    params.append(
        pytest.param(
            Backend("cuda", torch.ops.peft_kernels, "cuda"),
            id="cuda",
            marks=pytest.mark.skipif(not (INFO["cuda_archs"] and torch.cuda.is_available()), reason="no CUDA device"),
        )
    )
    return params


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return request.param
