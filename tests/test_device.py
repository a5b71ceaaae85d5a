"""The one device choice (marginlab.base.device.resolve_device): specs, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from marginlab.base.device import resolve_device
from marginlab.base.errors import ConfigError


def test_cpu_and_auto_without_cuda() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")  # the rank only picks a GPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cuda:", "gpu", "", "cuda:-1", "cpu:0"])
def test_bad_spec_is_a_one_line_error(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.device = .* is not a device; use one of") as info:
        resolve_device(spec, key="train.device")
    assert "\n" not in str(info.value) and '"cuda:N"' in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1", "CUDA"])
def test_cuda_unavailable_is_a_one_line_error(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_device(spec, key="train.device")
    msg = str(info.value)
    assert msg == f'train.device = "{spec}" but no CUDA device is available; use "auto" or "cpu"'
    with pytest.raises(ConfigError, match=r'^device = "cuda" but no CUDA device is available'):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_specs_on_a_gpu_machine() -> None:
    n = torch.cuda.device_count()
    assert resolve_device("cuda") == torch.device("cuda") and str(resolve_device("auto")) == "cuda"
    assert resolve_device("cuda", local_rank=n - 1) == torch.device("cuda", n - 1)
    assert resolve_device(f"cuda:{n - 1}", local_rank=0) == torch.device("cuda", n - 1)  # explicit wins
    with pytest.raises(ConfigError, match=rf"this machine has {n} CUDA device\(s\)"):
        resolve_device(f"cuda:{n}")
