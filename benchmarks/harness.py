"""What the engine benchmarks share: their engine flags and the engine built from them.

Every benchmark that runs an :class:`~graphrt.engine.Engine` takes every engine setting as a
flag (``EngineConfig.add_cli_args``: the same names as ``python -m graphrt.serve``), with its
own defaults where its workload needs them, and fixes the few that its measurement depends on
(the batch-size buckets it times, the context it needs). Benchmarks import this by name, as
they import each other (``benchmarks/`` is on ``sys.path`` when one runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from graphrt import Engine, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Every engine setting as a flag, in its own group; ``defaults``: this benchmark's."""
    EngineConfig.add_cli_args(parser.add_argument_group("engine"))
    parser.set_defaults(**defaults)


def build_engine(args: argparse.Namespace, **fixed: Any) -> Engine:
    """The engine the flags ask for, with ``fixed`` settings (what the benchmark's measurement
    depends on) overriding them."""
    config = EngineConfig.from_cli_args(args).replace(**fixed)
    return Engine.from_config(config, show_progress=False)
