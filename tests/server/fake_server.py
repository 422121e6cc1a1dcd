"""Serves ``create_app(FakeEngine)`` with hypercorn: ``python -m tests.server.fake_server PORT [flags]``.

Lets the end-to-end tests run against the HTTP layer alone (fast), with the
same flags ``serving.main`` takes for the server side.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

from serving.api.app import create_app
from serving.main import build_configs, build_parser
from tests.server.fake_engine import FakeEngine, load_default_tokenizer


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)
    args = build_parser().parse_args(argv)
    _, server_config = build_configs(args)
    engine = FakeEngine(load_default_tokenizer(), max_model_len=args.max_model_len or 512)
    app = create_app(engine, server_config)
    hc = Config()
    hc.bind = [f"127.0.0.1:{server_config.port}"]
    logging.getLogger(__name__).info("fake server ready")
    asyncio.run(serve(app, hc))


if __name__ == "__main__":
    main(sys.argv[1:])
