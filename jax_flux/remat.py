"""Names the ops give the values that rematerialisation would otherwise recompute
with communication, and a ``jax.checkpoint`` policy that saves them.

Under ``jax.checkpoint`` (``nnx.remat``, MaxText's ``remat_policy``) the
backward pass recomputes the forward values it needs from the checkpoint's
inputs. For these ops that means running the collective again: a second
AG-GEMM per column-parallel layer (its gathered x feeds the weight gradient,
its output the activation's derivative) and a second GEMM-RS per
row-parallel layer whenever a later op in the checkpoint needs its output (a
norm of the residual stream does). Each op therefore tags, in its
differentiated forward, what it produces, with ``jax.ad_checkpoint.
checkpoint_name``:

* ``AG_OUTPUT``   ``all_gather_matmul``'s result, [m * P, n];
* ``AG_GATHERED`` its gathered x, [m * P, K], the weight gradient's operand;
* ``RS_OUTPUT``   ``matmul_reduce_scatter``'s result, [M / P, N].

``save_collective_matmuls`` saves exactly these and recomputes everything
else (norms, activations, attention), so a rematerialised layer
communicates no more than one that is not. Combine it with a policy of your
own through ``jax.checkpoint_policies.save_from_both_policies``. Every impl
("xla", "ring", "fused") tags the same values.
"""

from __future__ import annotations

import jax

AG_OUTPUT = "jax_flux.all_gather_matmul"
AG_GATHERED = "jax_flux.all_gather_matmul.gathered"
RS_OUTPUT = "jax_flux.matmul_reduce_scatter"
NAMES = (AG_OUTPUT, AG_GATHERED, RS_OUTPUT)

save_collective_matmuls = jax.checkpoint_policies.save_only_these_names(*NAMES)

# What models.LlamaConfig.remat and similar options name.
POLICIES = ("none", "full", "collective_matmuls")


def policy(name: str):
    """``(remat?, policy)`` for a policy name of ``POLICIES``.

    ``"none"``: no checkpoint; ``"full"``: save only the checkpoint's inputs
    (recompute everything, communication included); ``"collective_matmuls"``:
    ``save_collective_matmuls``.

    Raises:
      ValueError: for another name.
    """
    if name not in POLICIES:
        raise ValueError(f"remat policy must be one of {POLICIES}, got {name!r}")
    if name == "none":
        return False, None
    return True, (save_collective_matmuls if name == "collective_matmuls" else None)
