"""The ``rmsnorm`` command: ``info``, ``bench``, ``reproduce``."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(_: argparse.Namespace) -> int:
    import torch

    import rmsnorm
    from rmsnorm.backends.cpu import build

    print(f"rmsnorm {rmsnorm.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  platform {platform.platform()}")
    print(f"threads {torch.get_num_threads()} (torch.get_num_threads)  cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}  cuda {torch.cuda.is_available()}")
    from rmsnorm.bench.alloc import allocator, find_tcmalloc

    tc = find_tcmalloc()
    print(f"allocator {allocator()}  (tcmalloc {'at ' + tc if tc else 'not installed: Debian libtcmalloc-minimal4'}; "
          "rmsnorm bench/reproduce can re-run under it)")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print("backends (best first):")
    for b in rmsnorm.backends():
        state = "available" if b.available else f"unavailable: {b.reason.splitlines()[0][:200]}"
        print(f"  {b.name:<10} {state}")
        print(f"  {'':<10} devices {', '.join(b.devices)}; dtypes {', '.join(b.dtypes)}; {b.description}")
    print(f"cpu kernels: {build.status()}")
    from rmsnorm.reproduce.data import status

    for name, state in status().items():
        print(f"reproduce data {name}: {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmsnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, backends and why any is unavailable").set_defaults(fn=_info)
    from .bench.cli import add_parser as add_bench
    from .reproduce.cli import add_data_parser
    from .reproduce.cli import add_parser as add_reproduce

    add_reproduce(sub)
    add_bench(sub)
    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
