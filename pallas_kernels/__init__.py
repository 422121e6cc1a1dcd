"""Attention kernels over the paged KV cache, dispatched by backend.

``ragged_paged_attention`` and ``write_kv`` are the only entry points the model
uses. Backends (``dispatch.BACKENDS``, the ``--attention-backend`` values):
``"xla"`` (the pure-jnp reference in ``reference.py``), ``"cpu"`` (the C++ FFI
kernel in the ``cpu/`` sub-package, which is not Pallas),
``"pallas_tpu"`` (``tpu_attention.py``, ``tpu_write_kv.py``), ``"pallas_gpu"``
(``gpu_attention.py``; the KV write stays an XLA scatter), their
``*_interpret`` variants that run the kernel bodies on CPU, and ``"auto"``.
Tile sizes live in ``tiling.py``; ``export_utils.export_for`` lowers any of
this for ``tpu``/``cuda`` from a CPU host.
"""

from pallas_kernels.dispatch import BACKENDS, ragged_paged_attention, write_kv  # noqa: F401
