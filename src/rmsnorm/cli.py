"""The ``rmsnorm`` command: ``info``, ``build``, ``bench``, ``reproduce``, ``data``."""

from __future__ import annotations

import argparse
import platform
import sys

from .cli_args import Parser, run_command


def _info(_: argparse.Namespace) -> int:
    import torch

    import rmsnorm
    from rmsnorm.backends.cpu import build

    print(f"rmsnorm {rmsnorm.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  platform {platform.platform()}")
    print(f"threads {torch.get_num_threads()} (torch.get_num_threads)  cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}  cuda {torch.cuda.is_available()}")
    from rmsnorm.host import allocator, find_tcmalloc

    tc = find_tcmalloc()
    print(f"allocator {allocator()}  (tcmalloc {'at ' + tc if tc else 'not installed: Debian libtcmalloc-minimal4'}; "
          "rmsnorm bench/reproduce can re-run under it)")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    from rmsnorm.backends import registry

    env, why = registry.env_default()
    if env is not None:
        print(f"{registry.ENV_VAR}={env}" + (f"  (unusable: {why})" if why else "  (the default backend)"))
    print("backends (best first):")
    for b in rmsnorm.backends():
        state = "available" if b.available else f"unavailable: {b.reason}"
        print(f"  {b.name:<10} {state}")
        print(f"  {'':<10} devices {', '.join(b.devices)}; dtypes {', '.join(b.dtypes)}; {b.description}")
    print(f"cpu kernels: {build.status()}")
    from rmsnorm.reproduce.data import status

    for name, state in status().items():
        print(f"reproduce data {name}: {state}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from rmsnorm.backends.cpu import build

    try:
        build.load(force=args.force)
    except build.BuildError as exc:
        print(f"rmsnorm build: {exc}", file=sys.stderr)
        return 1
    print(f"rmsnorm build: CPU kernels ready: {build.status()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rmsnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, backends and why any is unavailable").set_defaults(fn=_info)
    p = sub.add_parser("build", help="compile the C++ library (the fused CPU kernels and the GPU entry's "
                                     "launcher) now (else on first use), or say why not",
                       description="Compiles the C++ library into the cache (about 30-75 s on 2 cores): the fused "
                                   "CPU kernels, and the launcher the GPU eager entry calls Triton's compiled "
                                   "kernels with. No later process compiles on its first call; retries a "
                                   "remembered failure.")
    p.add_argument("--force", action="store_true", help="rebuild even when a build is cached")
    p.set_defaults(fn=_build)
    from .bench.cli import add_parser as add_bench
    from .reproduce.cli import add_data_parser
    from .reproduce.cli import add_parser as add_reproduce

    add_reproduce(sub)
    add_bench(sub)
    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(f"rmsnorm {args.command}", args.fn, args)
    except BrokenPipeError:  # `rmsnorm ... | head`: the reader left; stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
