"""`trisect` command line: one dispatcher, each subcommand's work lives in its own module.

  trisect serve   [--model tiny-llava] [--grpc-port 50051] [--http-port 8000] ...
  trisect bench   engine | router | transfer | overhead | memory | serve | soak | shift  [...]
  trisect client  [--image F] "prompt"
  trisect redis   start a private redis-server on loopback and print its URL
  trisect roles   [set ID ROLE]  instances and their roles (role switching)
"""
from __future__ import annotations

import sys

BENCHES = {
    "engine": "services.bench.engine",
    "router": "services.bench.router",
    "transfer": "services.bench.transfer",
    "overhead": "services.bench.overhead",
    "memory": "services.bench.memory",
    "serve": "services.bench.serve",
    "soak": "services.bench.soak",
    "shift": "services.bench.shift",
}


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: trisect bench {{{' | '.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from services.serve import main as serve
        return serve(rest)
    if cmd == "bench":
        return _bench(rest)
    if cmd == "client":
        from services.client import main as client
        return client(rest)
    if cmd == "roles":
        from services.roles_cli import main as roles
        return roles(rest)
    if cmd == "redis":
        from cluster.redis_server import main as redis
        return redis(rest)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
