"""The decoder-only LMs and encoders, their checkpoints and their quantization.

Package order: ``pallas_kernels`` and ``sharding`` <- ``model`` <- ``serving``.

- ``config``: ``ModelConfig.from_hf``; ``decoder`` / ``layers``: the float
  model (``DecoderLM``); ``attention``: the KV cache and attention metadata
  pytrees; ``api``: the functional forward the engine jits.
- ``ragged``: ``pack_ragged``, the token-major batch layout every caller uses.
- ``loader`` (format detection), ``hf_loader``, ``gguf``, ``orbax_io``: read
  checkpoints (``default``: the embedded model; ``tokenizer``); ``weights``:
  the Hugging Face name map, shape checks and run-time updates; ``fusion``:
  q|k|v and gate|up fused at load.
- ``quant``: ``--quantization w8a8_int8`` as a module swap after loading.
- ``generate``: a reference greedy generator for tests; ``decoder_embed``,
  ``encoder``, ``encoder_loader``, ``pooling``: embedding and scoring models.
"""
