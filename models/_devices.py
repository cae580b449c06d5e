"""Entry points call this before importing jax: emulate CPU devices when there is no GPU."""

import os


def emulate_cpu_devices(count: int) -> None:
    """Asks XLA for ``count`` CPU devices (harmless on GPU hosts: GPUs stay the default)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def pick_devices(count: int, what: str = "--tp"):
    """The first ``count`` GPUs if JAX has them, else the first ``count`` CPU devices;
    ``what`` names the option that asked for them in the error."""
    import jax

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    pool = gpus or jax.devices("cpu")
    if len(pool) < count:
        raise ValueError(f"{what} needs {count} devices, found {len(pool)} "
                         f"{'GPUs' if gpus else 'CPU devices'}")
    return pool[:count]
