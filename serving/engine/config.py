"""Engine configuration (frozen, validated); argparse lives in serving/main.py."""

from __future__ import annotations

import dataclasses
from typing import Optional


DTYPES = ("auto", "float32", "bfloat16")  # --dtype and --kv-cache-dtype


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load a model and size its KV cache.

    Flag names in serving/main.py follow vLLM (SGLang spellings as aliases).
    """

    model: Optional[str] = None  # HF folder, GGUF file or converted folder; None = embedded default
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16"
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) | "float32" | "bfloat16"
    quantization: Optional[str] = None  # None | "w8a8_int8" (model/quant.py)
    max_model_len: Optional[int] = None  # None: min(model's max positions, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    page_size: int = 16
    gpu_memory_utilization: float = 0.9  # fraction of device memory for weights + KV cache
    num_pages: Optional[int] = None  # absolute override of the KV page count
    kv_cache_memory_bytes: Optional[int] = None  # absolute override of the KV budget
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    nnodes: int = 1  # multi-host (SGLang names): processes in one jax.distributed mesh
    node_rank: int = 0  # this process; rank 0 serves HTTP, the others follow in lockstep
    dist_init_addr: Optional[str] = None  # HOST:PORT of the coordinator (PORT+1: control)
    seed: int = 0
    compile_cache_dir: Optional[str] = "~/.cache/jax-serve/xla"  # None disables
    precompile: bool = True  # compile every bucket at start-up
    decode_buckets: tuple[int, ...] = ()  # () = powers of two up to max_num_seqs
    prefill_buckets: tuple[int, ...] = ()  # () = powers of two up to max_num_batched_tokens
    async_scheduling: bool = True  # schedule step N+1 while step N runs on the device
    max_queue_size: int = 1024  # waiting requests beyond this are refused (503)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.kv_cache_dtype not in DTYPES:
            raise ValueError("kv_cache_dtype must be auto, float32 or bfloat16, got "
                             f"{self.kv_cache_dtype!r}")
        if self.quantization not in (None, "w8a8_int8"):
            raise ValueError(f"quantization must be w8a8_int8 or None, got {self.quantization!r}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be positive")
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError("parallel sizes must be at least 1")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
