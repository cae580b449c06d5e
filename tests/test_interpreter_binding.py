"""The CPU side of the binding: mode selection, the host-tensor adapter, concurrent kernels."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import triton
import triton.language as tl
from triton.language.extra import cuda

from custom_calls import _interpreter_shim, _mode, interpreter_ready, signals
from custom_calls._host_tensor import HostTensor
from custom_calls._interpreter_launch import aligned, run_interpreted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_this_process_interprets():
    assert interpreter_ready()


@pytest.mark.parametrize("platforms,expected", [("cpu", False), ("tpu,cpu", False)])
def test_jax_platforms_without_gpu_means_cpu_only(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert _mode.gpu_backend_possible() is expected


def test_no_gpu_plugin_means_cpu_only(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(_mode, "_module_installed", lambda name: False)
    assert not _mode.gpu_backend_possible()
    monkeypatch.setattr(_mode, "_module_installed", lambda name: name == "jax_plugins.xla_cuda13")
    assert _mode.gpu_backend_possible()


def _python(code, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TRITON_INTERPRET", "JAX_PLATFORMS")}
    full_env.update(env, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_import_arranges_the_interpreter_on_a_cpu_only_host():
    r = _python("import jax_flux, triton; print(triton.knobs.runtime.interpret)",
                JAX_PLATFORMS="cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_triton_imported_first_in_compiled_mode_gives_a_clear_error():
    code = ("import triton, jax, jax.numpy as jnp, jax_flux\n"
            "from custom_calls.gemm import matmul\n"
            "matmul(jnp.ones((8, 8)), jnp.ones((8, 8)))\n")
    r = _python(code, JAX_PLATFORMS="cpu")
    assert r.returncode != 0
    assert "Set TRITON_INTERPRET=1 before anything imports triton" in r.stderr


def test_host_tensor_looks_like_what_triton_reads():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = HostTensor(a)
    assert t.data_ptr() == a.ctypes.data == t.untyped_storage().data_ptr()
    assert str(t.dtype) == "torch.float32" and t.size() == (3, 4) and t.stride() == (4, 1)
    import ml_dtypes
    assert str(HostTensor(np.zeros(2, ml_dtypes.bfloat16)).dtype) == "torch.bfloat16"
    with pytest.raises(ValueError, match="C-contiguous"):
        HostTensor(a.T)
    with pytest.raises(ValueError, match="no element type"):
        HostTensor(np.zeros(2, np.complex64))


@triton.jit
def _arrive_and_wait(counter_ptr, order_ptr, out_ptr, RANKS: tl.constexpr, MAX_SPINS: tl.constexpr):
    # Each "rank" takes a ticket, then spins until every rank has arrived.
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    tl.store(order_ptr, ticket)
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    spins = 0
    while (seen < RANKS) & (spins < MAX_SPINS):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        spins += 1
    tl.store(out_ptr, seen)


def test_kernels_in_threads_spin_wait_on_each_other():
    # Needs the interpreter shim: kernels in 4 threads at once, each waiting for
    # the others' atomics. Without concurrency this would time out at 1 arrival.
    ranks = 4
    counter = aligned(np.zeros(1, np.int32))  # shared by the threads: launches must not copy it
    results, errors = [None] * ranks, []

    def rank(r):
        try:
            order = np.zeros(1, np.int32)
            (out,) = run_interpreted(
                _arrive_and_wait, (1,), [counter, order], scalars=(),
                out_shapes=[np.zeros(1, np.int32)], input_output_aliases=(),
                zeroed_outputs=(), metaparams=(("MAX_SPINS", 20000), ("RANKS", ranks)))
            results[r] = int(out[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == [ranks] * ranks


@triton.jit
def _to_bf16(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def test_float32_to_bfloat16_rounds_to_nearest_even_like_a_gpu():
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from custom_calls import triton_call

    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    y = triton_call(jnp.asarray(x), kernel=_to_bf16,
                    out_shape=jax.ShapeDtypeStruct((64,), jnp.bfloat16), grid=1, N=64)
    assert np.asarray(y).tobytes() == x.astype(ml_dtypes.bfloat16).tobytes()


@triton.jit
def _spin_for(ms, out_ptr):
    # As signals.wait_epoch times a wait: the GPU's global timer, in nanoseconds.
    start = cuda.globaltimer()
    now = start
    while now < start + ms.to(tl.int64) * 1_000_000:
        now = cuda.globaltimer()
    tl.store(out_ptr, now - start)


def _calls_on_this_thread(monkeypatch, name: str) -> list:
    """Replaces ``time.<name>`` for the test: the arguments of each call made on
    this thread (the one the kernel runs on) are recorded, then it is called."""
    import time

    calls, original, me = [], getattr(time, name), threading.get_ident()

    def recorded(*args):
        if threading.get_ident() == me:
            calls.append(args)
        return original(*args)

    monkeypatch.setattr(time, name, recorded)
    return calls


def test_the_gpu_global_timer_reads_the_host_clock_in_nanoseconds(monkeypatch):
    # What makes a fused op's timeout_s the same seconds on the CPU as on a GPU;
    # and a read sleeps first, so a spinning wait leaves the core to the
    # programs it waits for.
    import time

    pauses = _calls_on_this_thread(monkeypatch, "sleep")
    start = time.monotonic_ns()
    (spun,) = run_interpreted(_spin_for, (1,), [], scalars=((0, 150),),
                              out_shapes=[np.zeros(1, np.int64)], input_output_aliases=(),
                              zeroed_outputs=(), metaparams=())
    elapsed = time.monotonic_ns() - start
    assert 150_000_000 <= int(spun[0]) <= elapsed, (spun, elapsed)
    assert len(pauses) > 1 and set(pauses) == {(_interpreter_shim.POLL_PAUSE_S,)}


@triton.jit
def _wait_for(sig_ptr, status_ptr, table_ptr, target, patience, out_ptr, WORLD: tl.constexpr):
    ok = signals.wait_epoch(sig_ptr, target, patience, status_ptr, table_ptr, signals.WAIT_ROWS,
                            0, 0, 0, WORLD)
    tl.store(out_ptr, ok.to(tl.int32))


@pytest.mark.parametrize("signal,status,found", [(5, 0, 1), (4, 3, 0)],
                         ids=["arrived", "launch_already_failed"])
def test_a_wait_that_need_not_spin_reads_no_clock(monkeypatch, signal, status, found):
    # The signal already there, or an earlier wait of the launch failed (poll
    # once): no clock read, so in the interpreter no sleep either.
    reads = _calls_on_this_thread(monkeypatch, "monotonic_ns")
    arrays = [np.array([signal], np.int32), np.array([status, 0, 0, 0, 0, 0], np.int32),
              np.zeros(4, np.uint32)]
    (out,) = run_interpreted(_wait_for, (1,), arrays, scalars=((3, 5), (4, 1000)),
                             out_shapes=[np.zeros(1, np.int32)], input_output_aliases=(),
                             zeroed_outputs=(), metaparams=(("WORLD", 1),))
    assert int(out[0]) == found and not reads
