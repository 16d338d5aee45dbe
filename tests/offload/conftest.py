"""Shared by the offload tests: the native-AIO requirement and the I/O backend fixture.

Set MEMOPT_REQUIRE_NATIVE=1 (CI does) to make a missing native build fail instead of skip.
"""

from __future__ import annotations

import os

import pytest

from memopt.offload.native_aio import native_available


def require_native() -> None:
    if not native_available():
        if os.environ.get("MEMOPT_REQUIRE_NATIVE") == "1":
            pytest.fail("MEMOPT_REQUIRE_NATIVE=1 but the native AIO library did not load")
        pytest.skip("native AIO library not built")


@pytest.fixture(params=["native", "threads"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The I/O backend an NVMe tier made in the test uses (``MEMOPT_AIO``)."""
    if request.param == "native":
        require_native()
    monkeypatch.setenv("MEMOPT_AIO", request.param)
    return request.param
