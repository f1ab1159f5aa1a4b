"""Speed and memory benchmark of rnnmath's layers; the same as ``rnnmath bench`` (the code is rnnmath/bench.py).

    python benchmarks/speed.py --quick            # H ∈ {64, 256}, T = 30, B = 64: a few minutes on 2 cores
    python benchmarks/speed.py                    # the full grid of docs/benchmarks.md
    python benchmarks/speed.py --json > out.json  # one JSON object instead of markdown tables
"""

import argparse
import sys

from rnnmath import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rnnmath vs torch.nn: training step, inference, peak memory")
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
