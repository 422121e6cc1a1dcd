"""Attention kernels over the paged KV cache, dispatched by backend.

``ragged_paged_attention`` and ``write_kv`` are the only entry points the model
uses. Backends: ``"xla"`` (the pure-jnp reference in ``reference.py``, the CPU
path); Pallas implementations for TPU and GPU plug in behind the same
signature (see ``dispatch.py``).
"""

from pallas_kernels.dispatch import ragged_paged_attention, write_kv  # noqa: F401
