"""The set-up's torch build decision (launch/torch_build.py) on mocked hardware probes."""
from __future__ import annotations

import pytest

from launch.torch_build import CPU_INDEX, PYPI, Choice, Probe, choose

LOGIN = Probe("x86_64", 0, False, None)
A100 = Probe("x86_64", 4, False, None)
GH200 = Probe("aarch64", 4, False, None)
MI250X = Probe("x86_64", 0, True, "6.2")


@pytest.mark.parametrize("probe, build, index", [
    (LOGIN, "cpu", CPU_INDEX),
    (A100, "cuda", PYPI),
    (GH200, "cuda", PYPI),
    (MI250X, "rocm", "https://download.pytorch.org/whl/rocm6.2"),
])
def test_detected_from_the_hardware(probe: Probe, build: str, index: str) -> None:
    c = choose(probe)
    assert (c.build, c.index) == (build, index)


def test_login_node_says_how_to_ask_for_the_gpu_build() -> None:
    assert "AXON_TORCH=cuda" in choose(LOGIN).reason


def test_request_overrides_detection() -> None:
    assert choose(LOGIN, "cuda") == Choice("cuda", PYPI, "AXON_TORCH=cuda; PyPI's CUDA build for x86_64")
    assert choose(A100, "CPU ").build == "cpu"
    assert choose(LOGIN, "rocm", "6.4").index == "https://download.pytorch.org/whl/rocm6.4"


def test_rocm_version_from_the_setting_wins_over_the_node() -> None:
    assert choose(MI250X, "", "6.4").index.endswith("/rocm6.4")


@pytest.mark.parametrize("probe, request_, rocm, message", [
    (LOGIN, "gpu", "", "AXON_TORCH='gpu' is not one of cpu|cuda|rocm"),
    (LOGIN, "rocm", "", "set AXON_ROCM=X.Y"),
    (LOGIN, "rocm", "6", "got '6'"),
    (GH200, "rocm", "6.4", "x86_64 only"),
    (Probe("ppc64le", 4, False, None), "", "", "use AXON_TORCH=cpu"),
])
def test_errors_name_the_setting(probe: Probe, request_: str, rocm: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("(", r"\(")):
        choose(probe, request_, rocm)
