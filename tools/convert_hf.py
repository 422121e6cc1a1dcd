"""Converts a Hugging Face model folder or a GGUF file into a jax-serve folder.

Usage::

    python tools/convert_hf.py SOURCE OUT_DIR [--dtype float32|bfloat16]

SOURCE is a Hugging Face folder (config.json + *.safetensors) or a .gguf file
(dequantized to float32 first). OUT_DIR receives:

    OUT_DIR/config.json      Hugging Face style config
    OUT_DIR/tokenizer*.json  tokenizer files, chat template included
    OUT_DIR/orbax/           Orbax checkpoint of the DecoderLM weights

Weights go through the explicit Hugging Face name map of ``model/weights.py``
(renames and transposes, shapes checked against the config) and are stored in
its checkpoint layout, q, k, v and gate, up apart; loading fuses them. Load the result
with ``model.loader.load_model(OUT_DIR)`` or serve it with
``python -m serving.main --model OUT_DIR``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

logger = logging.getLogger("convert_hf")

DTYPES = ("float32", "bfloat16")
# Extra files of a Hugging Face folder worth keeping beside the weights.
_EXTRA_FILES = ("generation_config.json",)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (documented by ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="convert_hf.py",
        description="Convert a Hugging Face folder or a GGUF file into a jax-serve folder "
                    "(config.json + tokenizer files + orbax/ checkpoint).",
        epilog="Example: python tools/convert_hf.py SmolLM2.Q4_1.gguf /tmp/smollm2 --dtype bfloat16")
    parser.add_argument("source", help="Hugging Face model folder or .gguf file")
    parser.add_argument("out_dir", help="output folder (its orbax/ must not exist yet)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the stored weights (default: float32)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT_DIR/orbax checkpoint")
    return parser


def convert(source: str | os.PathLike, out_dir: str | os.PathLike,
            dtype: str = "float32", force: bool = False) -> Path:
    """Converts ``source`` into ``out_dir``; returns ``out_dir``.

    Raises:
        FileNotFoundError: ``source`` is missing or holds no weights.
        FileExistsError: ``out_dir/orbax`` exists and ``force`` is False.
        ValueError: unsupported architecture, format or dtype; bad weights.
    """
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from model.config import ModelConfig
    from model.loader import detect_format
    from model.orbax_io import ORBAX_DIR, write_orbax
    from model.tokenizer import load_tokenizer
    from model.weights import check_pure, hf_names, pure_from_hf

    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {DTYPES}")
    src, out = Path(source), Path(out_dir)
    fmt = detect_format(src)
    if fmt == "orbax":
        raise ValueError(f"{src} is already a converted (orbax) folder")
    ckpt = out / ORBAX_DIR
    if ckpt.exists():
        if not force:
            raise FileExistsError(f"{ckpt} already exists (pass --force to replace it)")
        shutil.rmtree(ckpt)

    if fmt == "gguf":
        from model.gguf import read_gguf

        gguf_file = src if src.is_file() else next(src.glob("*.gguf"))
        hf_config, tensors = read_gguf(gguf_file)
    else:
        from model.hf_loader import read_hf_folder

        hf_config, tensors = read_hf_folder(src)
    config = ModelConfig.from_hf(hf_config)

    names = hf_names(config)
    selected = {}
    for name in tqdm(names, desc=f"converting {src.name}", unit="tensor"):
        if name in tensors:  # a missing one is reported by pure_from_hf
            selected[name] = np.asarray(tensors[name])
    pure = pure_from_hf(config, selected)  # renames and transposes
    check_pure(config, pure)  # shapes against the config
    pure = _map_leaves(pure, lambda a: np.asarray(a).astype(jnp.dtype(dtype)))

    hf_config = dict(hf_config)
    hf_config["torch_dtype"] = dtype
    write_orbax(out, hf_config, pure)
    tokenizer = load_tokenizer(src, fmt)
    tokenizer.save_pretrained(str(out))
    if fmt == "hf":
        for extra in _EXTRA_FILES:
            if (src / extra).is_file():
                shutil.copy2(src / extra, out / extra)
    logger.info("converted %s (%s, %d tensors) into %s as %s", src, fmt, len(names), out, dtype)
    return out


def _map_leaves(tree: dict, fn) -> dict:
    return {k: _map_leaves(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's internals are chatty
    try:
        out = convert(args.source, args.out_dir, args.dtype, args.force)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"convert_hf.py: error: {message}", file=sys.stderr)
        return 2
    print(f"converted {args.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
