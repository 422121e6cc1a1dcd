"""C++ XLA FFI kernels for the CPU backend (not Pallas: plain C++ custom calls).

``ffi.py`` builds ``csrc/*.cc`` into one shared library on first use and
registers its handlers; ``attention.py`` is the ragged paged attention the
``"cpu"`` attention backend dispatches to (``pallas_kernels/dispatch.py``);
``int8.py`` holds the int8 matmuls that ``model/quant.py`` swaps in for
``--quantization w8a8_int8`` on the CPU.
"""
