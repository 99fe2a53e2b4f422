"""pytest-benchmark configuration for bench/.

    ./run.sh bench                          full sizes (1M, 10M, 100M params)
    ./run.sh bench --bench-sizes 1M,10M     a subset
    pytest bench --benchmark-disable        smoke mode: tiny sizes, each case runs once
                                            (CI runs this, so the suite cannot rot)

Compare runs with ``pytest-benchmark compare``; cases are grouped by
(params, tensors, refresh) so each table compares implementations on one problem.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = {"smoke": 10_000, "1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}


def pytest_addoption(parser):
    parser.addoption("--bench-sizes", default=None,
                     help="comma-separated parameter counts: smoke,1M,10M,100M (default: smoke when "
                          "benchmarks are disabled, else 1M,10M,100M)")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")


def pytest_generate_tests(metafunc):
    if "numel" in metafunc.fixturenames:
        config = metafunc.config
        sizes = config.getoption("--bench-sizes")
        if sizes is None:
            disabled = config.getoption("benchmark_disable", default=False)
            sizes = "smoke" if disabled else "1M,10M,100M"
        metafunc.parametrize("numel", [SIZES[s] for s in sizes.split(",")], ids=sizes.split(","))
