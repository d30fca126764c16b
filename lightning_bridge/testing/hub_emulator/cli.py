"""``hub serve``: run the Hub emulator from a shell until Ctrl-C.

Reached as ``lightning-bridge hub serve ...`` or ``python -m lightning_bridge.testing.hub_emulator serve ...``.
"""

from __future__ import annotations

import argparse
import logging

from .emulator import HubEmulator


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description="Local Hugging Face Hub emulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a local Hub emulator until Ctrl-C",
        description="Serve a local Hub emulator (for testing publishing code) until Ctrl-C.",
    )
    serve.add_argument(
        "--root",
        default=None,
        help="folder for repos and blobs (default: a temporary folder, removed on exit)",
    )
    serve.add_argument("--port", type=int, default=0, help="TCP port (default 0: pick a free port)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on every request")
    serve.add_argument("--username", default=None, help="user name reported by whoami")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``hub serve --root DIR --port N [--host H] [--token T]``: serve until Ctrl-C; returns 0."""
    args = _build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(message)s")
    emu = HubEmulator(args.root, host=args.host, port=args.port, token=args.token, username=args.username)
    try:
        emu.start()
        env = f"HF_ENDPOINT={emu.endpoint} HF_HUB_DISABLE_XET=1"
        if args.token:
            env += " HF_TOKEN=<token>"
        print(f"Hub emulator serving {emu.root} at {emu.endpoint}", flush=True)
        print(f"Client settings: {env}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        emu.serve_forever()
    finally:
        emu.__exit__(None, None, None)
    return 0
