"""``python -m fedllm.federation.flower superlink|supernode|executor|worker|app``: fedllm's deployment processes.

An entry point: the process-wide settings (environment, logging) are made here, in :func:`main`,
before anything imports flwr or the model — never in the library modules it calls.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedllm.federation.flower.run_config import TELEMETRY_OFF, FlowerRunConfig


def main(argv: list[str] | None = None) -> int:
    """Site and coordinator helpers (see docs/deploy.md)::

        python -m fedllm.federation.flower superlink --public HOST:PORT [flower-superlink args]
        python -m fedllm.federation.flower supernode [flower-supernode args]
        python -m fedllm.federation.flower secret FILE                   # a site's SuperExec secret (0600)
        python -m fedllm.federation.flower executor --runtime-api-address 127.0.0.1:PORT \
            --superexec-auth-secret-file FILE --insecure                 # a site's long-lived ClientApp
        python -m fedllm.federation.flower worker --socket PATH          # a site's warm worker
        python -m fedllm.federation.flower app RECIPE [overrides] --app-dir DIR --out RUNS

    ``superlink`` and ``supernode`` take Flower's own arguments after fedllm's and run only
    fedllm's apps (:mod:`fedllm.federation.flower.gate` says what each port exposes).
    """
    p = argparse.ArgumentParser(prog="python -m fedllm.federation.flower")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="serve this site's ClientApp requests with its model loaded once")
    w.add_argument("--socket", required=True, help="Unix socket path (its key is written to PATH.key, mode 0600)")
    e = sub.add_parser("executor", help="run this site's ClientApp tasks in one long-lived process "
                       "(a SuperNode started with --isolation process)")
    e.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, e.g. 127.0.0.1:9094")
    e.add_argument("--superexec-auth-secret-file", required=True, help="the SuperExec secret file the SuperNode was given")
    e.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback only)")
    e.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS")
    a = sub.add_parser("app", help="write a Flower App directory that runs RECIPE (for flwr run)")
    a.add_argument("recipe")
    a.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.rounds=2")
    a.add_argument("--app-dir", required=True, help="folder to write (pyproject.toml)")
    a.add_argument("--out", required=True, help="run directories' root on the coordinator (absolute)")
    a.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for one client's reply")
    sc = sub.add_parser("secret", help="write a fresh SuperExec secret file (32 random bytes, mode 0600)")
    sc.add_argument("path", help="the file to create (refused if it exists)")
    # no abbreviations: an abbreviated flag is Flower's to read, never taken for one of fedllm's
    sl = sub.add_parser("superlink", allow_abbrev=False,
                        help="the coordinator's SuperLink: Fleet API public, Control API on loopback")
    sl.add_argument("--public", required=True, help="HOST:PORT where sites reach the Fleet API (e.g. 0.0.0.0:9092)")
    sl.add_argument("--max-request-mb", type=float, default=32.0,
                    help="largest request body the public port reads, in MiB (above: 413, connection closed); "
                         "Flower sends at most 5 MiB array chunks, a compressed update unchunked")
    sl.add_argument("--max-requests-per-s", type=float, default=200.0,
                    help="requests per second per client IP on the public port (above: 503, which Flower retries)")
    sl.add_argument("--max-signature-age-s", type=float, default=10.0,
                    help="oldest SuperNode signature accepted, in seconds (Flower alone: 305); keep clocks in sync")
    sn = sub.add_parser("supernode", allow_abbrev=False, help="a site's SuperNode that runs only fedllm's apps")
    for q in (sl, sn):
        q.add_argument("--allow-insecure", action="store_true",
                       help="accept --insecure and --isolation subprocess (loopback tests only)")
    args, flower_args = p.parse_known_args(argv)
    if flower_args and args.command not in ("superlink", "supernode"):
        p.error(f"unrecognized arguments: {' '.join(flower_args)}")
    for k, v in TELEMETRY_OFF.items():  # before flwr is imported: it reads them at import
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "app":
        from fedllm.config import RecipeError, dump_recipe, flower_problem, load_recipe  # noqa: PLC0415
        from fedllm.federation.flower.launch import write_app  # noqa: PLC0415

        try:
            recipe = load_recipe(args.recipe, args.overrides)
            problem = flower_problem(recipe)
            if problem is not None:
                raise RecipeError(*problem)
        except RecipeError as exc:
            print(f"fedllm: error: {exc}", file=sys.stderr)
            return 2
        cfg = FlowerRunConfig(dump_recipe(recipe), str(Path(args.out).resolve()), args.timeout_s)
        print(write_app(Path(args.app_dir), cfg) / "pyproject.toml")
        return 0
    if args.command == "secret":
        return _secret(args.path)
    if args.command == "superlink":
        return _superlink(args, flower_args)
    if args.command == "supernode":
        from fedllm.federation.flower.gate import serve_supernode  # noqa: PLC0415

        serve_supernode(flower_args, insecure_ok=args.allow_insecure)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "executor":
        from fedllm.federation.flower.executor import options_from_args, serve_executor  # noqa: PLC0415

        serve_executor(options_from_args(args.runtime_api_address, args.superexec_auth_secret_file, args.insecure,
                                         args.root_certificates))
        return 0
    from fedllm.federation.flower.worker import serve_worker  # noqa: PLC0415

    serve_worker(args.socket)
    return 0


def _secret(path: str) -> int:
    """Write a site's SuperExec secret file (32 random bytes, mode 0600); never over an existing one."""
    from fedllm.federation.flower.worker import write_secret  # noqa: PLC0415

    if os.path.lexists(path):
        print(f"fedllm: error: {path} exists; a running site and its executor may share it "
              "(remove it first to replace it)", file=sys.stderr)
        return 2
    write_secret(Path(path))
    print(path)
    return 0


def _superlink(args: argparse.Namespace, flower_args: list[str]) -> int:
    """fedllm's SuperLink with the public listener's caps from the command line."""
    from fedllm.federation.flower.gate import serve_superlink  # noqa: PLC0415
    from fedllm.federation.flower.limits import MIB, PublicLimits  # noqa: PLC0415

    try:
        if not 0 < args.max_request_mb < 1 << 20:
            raise ValueError(f"--max-request-mb: expected a size in MiB above 5 (Flower's array chunks), "
                             f"got {args.max_request_mb}")
        cap = int(args.max_request_mb * MIB)
        limits = PublicLimits(max_request_bytes=cap, rate_per_s=args.max_requests_per_s,
                              max_signature_age_s=args.max_signature_age_s,
                              max_inflight_bytes=max(PublicLimits.max_inflight_bytes, 4 * cap))
    except (ValueError, OverflowError) as exc:
        print(f"fedllm: error: superlink: {exc}", file=sys.stderr)
        return 2
    serve_superlink(flower_args, args.public, insecure_ok=args.allow_insecure, limits=limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
