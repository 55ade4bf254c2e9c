"""``eagle app``: serve the Gradio web app."""

from __future__ import annotations

import argparse

from eagle.settings import Settings


def _run_app(args: argparse.Namespace, settings: Settings) -> int:
    from app.launch import launch

    launch(settings, host=args.host, port=args.port, share=args.share or None)
    return 0


def register(subparsers) -> None:
    """Add the ``app`` subcommand."""
    parser = subparsers.add_parser(
        "app",
        help="Serve the web app (Gradio).",
        description="Serve the EAGLE web app on EAGLE_APP__HOST:EAGLE_APP__PORT.",
    )
    parser.add_argument("--host", default=None, help="Address to bind (default: settings, 127.0.0.1).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: settings, 7860).")
    parser.add_argument("--share", action="store_true", help="Also open a public Gradio share link.")
    parser.set_defaults(func=_run_app)
