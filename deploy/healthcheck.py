"""Container health probe: ``python -m deploy.healthcheck edge|app`` exits 0 when the server answers 200.

The image has no curl; this uses the standard library only and reads the port from the same settings as the
server (``EAGLE_SERVICE__PORT`` / ``EAGLE_APP__PORT``), so a port changed by environment variable is probed
where the server really listens. ``edge`` probes ``/healthz``, ``app`` probes the web page ``/``.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

TARGETS = {"edge": ("service", "/healthz"), "app": ("app", "/")}


def probe_url(target: str) -> str:
    """The URL probed for ``target`` (always on loopback: the probe runs inside the container)."""
    from eagle.settings import load_settings

    group, path = TARGETS[target]
    port = getattr(load_settings(), group).port
    return f"http://127.0.0.1:{port}{path}"


def check(url: str, timeout: float = 5.0) -> bool:
    """Whether ``GET url`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL built above
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    """Probe and return the exit code (0 healthy, 1 not)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS), help="edge: the REST service; app: the web app.")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    url = probe_url(args.target)
    healthy = check(url, args.timeout)
    if not healthy:
        print(f"unhealthy: no 200 from {url}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
