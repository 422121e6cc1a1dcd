"""C++ XLA FFI kernels for the CPU backend (not Pallas: plain C++ custom calls).

``ffi.py`` builds ``csrc/*.cc`` into one shared library on first use and
registers its handlers; ``attention.py`` is the ragged paged attention the
``"cpu"`` attention backend dispatches to (``pallas_kernels/dispatch.py``);
``int8.py`` holds the int8 matmuls that ``model/quant.py`` swaps in for
``--quantization w8a8_int8`` on the CPU. Each kernel has AVX-512, AVX2+FMA
and portable code paths, picked at run time from the CPU's features
(``JAX_SERVE_CPU_ISA`` forces one; ``ffi.cpu_isa()`` names the one that
runs); ``testing.py`` helps tests run on each.
"""
