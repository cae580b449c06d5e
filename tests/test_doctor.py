"""``python -m jax_flux.doctor``: what a host gives the fused kernels, before a run.

On CPU devices every check that applies passes and the GPU-only ones skip;
invalid settings and a corrupt tuning cache fail, naming what is wrong; the
GPU checks' logic runs with the GPU list stubbed; peer links over the fake
libcuda (NVLink-like, PCIe-like, a missing device).
"""

import json
import os
import subprocess
import sys
import types

import pytest

from custom_calls import cuda_driver
from jax_flux import _tuning_records, doctor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["versions", "devices", "triton mode", "module loading", "peer links", "memory",
         "failure reporting", "matmul precision", "tuning"]


def _by_name(checks):
    return {c.name: c for c in checks}


def test_on_cpu_devices_nothing_fails_and_gpu_checks_skip():
    checks = doctor.run()
    assert [c.name for c in checks] == NAMES
    found = _by_name(checks)
    assert not [c for c in checks if c.status == "fail"], checks
    for name in ("module loading", "peer links", "memory"):
        assert found[name].status == "skip", found[name]
    assert "interpreter" in found["devices"].detail
    assert found["triton mode"].detail.startswith("interpreted")
    assert found["failure reporting"].detail == "status check sync"
    assert found["matmul precision"].detail.startswith(
        "jax_default_matmul_precision=None: float32 matmuls on GPUs run tensorfloat32")


def test_matmul_precision_says_what_float32_runs():
    import jax

    with jax.default_matmul_precision("highest"):
        assert "run exact float32" in doctor.matmul_precision().detail
    with jax.default_matmul_precision("TF32_TF32_F32_X3"):
        assert "three tensorfloat32 passes" in doctor.matmul_precision().detail
    with jax.default_matmul_precision("BF16_BF16_F32"):
        check = doctor.matmul_precision()
    assert check.status == "warn" and "not what the fused kernels run" in check.detail


def test_command_line_json_and_exit_code():
    env = {**os.environ, "JAX_FLUX_STATUS_CHECK": "bogus"}
    run = subprocess.run([sys.executable, "-m", "jax_flux.doctor", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    found = {c["name"]: c for c in json.loads(run.stdout)}
    assert list(found) == NAMES
    assert found["failure reporting"]["status"] == "fail"
    assert "JAX_FLUX_STATUS_CHECK must be one of ('sync', 'async'), got 'bogus'" in \
        found["failure reporting"]["detail"]


@pytest.mark.parametrize("var,value,match", [
    ("JAX_FLUX_WATCHDOG_INTERVAL_S", "-1", "JAX_FLUX_WATCHDOG_INTERVAL_S must be in"),
    ("JAX_FLUX_ON_PEER_TIMEOUT", "ignore", "JAX_FLUX_ON_PEER_TIMEOUT must be one of"),
])
def test_invalid_failure_settings_fail(monkeypatch, var, value, match):
    monkeypatch.setenv(var, value)
    check = doctor.failure_reporting()
    assert check.status == "fail" and match in check.detail, check


def test_invalid_interpreter_schedule_fails(monkeypatch):
    monkeypatch.setenv("JAX_FLUX_INTERPRETER_PROGRAMS", "sometimes")
    check = doctor.triton_mode()
    assert check.status == "fail" and "JAX_FLUX_INTERPRETER_PROGRAMS must be" in check.detail


def test_tuning_records_are_counted_and_a_corrupt_cache_fails(monkeypatch, tmp_path):
    cache = tmp_path / "autotune.json"
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(cache))
    check = doctor.tuning()
    assert check.status == "ok" and "0 record(s)" in check.detail and "runs xla" in check.detail
    kind = doctor.jax.devices()[0].device_kind
    other = tmp_path / "tuned.json"
    other.write_text(json.dumps({f"{kind}|all_gather_matmul|m=8,k=8,n=8|float32|P=8": {},
                                 "NVIDIA H100|all_gather_matmul|m=8,k=8,n=8|float32|P=8": {}}))
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(other))
    check = doctor.tuning()
    assert check.status == "ok" and "1 record(s)" in check.detail, check
    bad = tmp_path / "bad.json"
    bad.write_text('{"truncated": ')
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(bad))
    check = doctor.tuning()
    assert check.status == "fail" and str(bad) in check.detail, check
    _tuning_records._loaded.pop(str(other), None)


def test_versions_outside_the_tested_range_warn(monkeypatch):
    assert doctor._parts("0.11.2.dev20260101+cuda13") == (0, 11, 2)
    assert doctor._parts("3.6.0") == (3, 6, 0)
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda d: "3.5.1" if d == "triton" else real(d))
    check = doctor.versions()
    assert check.status == "warn" and "triton 3.5.1 is outside the tested [3.6, 3.10)" in \
        check.detail, check
    monkeypatch.setattr(doctor, "_version", lambda d: None if d == "triton" else real(d))
    assert doctor.versions().status == "fail"


def test_gpu_settings(monkeypatch):
    # Stub the GPU list: the checks read only the environment then.
    monkeypatch.setattr(doctor, "_gpus", lambda: [types.SimpleNamespace(local_hardware_id=0)])
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    check = doctor.module_loading()
    assert check.status == "warn" and "CUDA_MODULE_LOADING=EAGER" in check.detail
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    assert doctor.module_loading().status == "ok"
    for var in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(var, raising=False)
    check = doctor.memory()
    assert check.status == "ok" and "75%" in check.detail, check
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    assert doctor.memory().status == "warn"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert doctor.memory().status == "ok"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "most")
    assert doctor.memory().status == "fail"
    # With GPUs, no tuning records is a warning: impl="auto" never runs the kernels.
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", os.devnull + ".absent")
    check = doctor.tuning()
    assert check.status == "warn" and "benchmarks.tune" in check.detail


def test_peer_links_over_the_fake_driver(fake_driver, monkeypatch):
    check = doctor.peer_links([0, 1, 2])
    assert check.status == "ok" and "6 directed links" in check.detail, check
    assert doctor.peer_links([0]).status == "skip"
    fail = doctor.peer_links([0, 99])
    assert fail.status == "fail" and "CUDA_ERROR_INVALID_DEVICE" in fail.detail, fail
    monkeypatch.setenv("FAKE_CUDA_P2P_ATOMICS", "0")  # read by cuInit: PCIe-like links
    cuda_driver.lib.cache_clear()
    try:
        check = doctor.peer_links([0, 1])
        assert check.status == "fail" and "[(0, 1), (1, 0)]" in check.detail, check
        assert cuda_driver.p2p_attributes(0, 1) == {"performance_rank": 0, "access": 1,
                                                    "native_atomics": 0}
    finally:
        monkeypatch.delenv("FAKE_CUDA_P2P_ATOMICS")
        cuda_driver.lib.cache_clear()


def test_tested_ranges_are_pyprojects_pins():
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    assert '"jax>=0.10.2,<0.13"' in text and doctor._JAX_TESTED == ((0, 10, 2), (0, 13))
    assert '"triton>=3.6,<3.10"' in text and doctor._TRITON_TESTED == ((3, 6), (3, 10))
