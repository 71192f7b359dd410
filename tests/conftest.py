"""Test-wide set-up: the Triton interpreter on CPU-only machines, and the gpu marker.

TRITON_INTERPRET must be set before anything imports triton: triton decides
at decoration time whether a @triton.jit function is compiled or interpreted.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_addoption(parser):
    group = parser.getgroup("parity")
    group.addoption("--parity-full", action="store_true", default=False,
                    help="run the full parity product instead of all pairs of factor values")
    group.addoption("--parity-report", default=os.environ.get("PARITY_REPORT"), metavar="PATH",
                    help="write the parity results as markdown to PATH (default: $PARITY_REPORT)")


def pytest_sessionfinish(session, exitstatus):
    from dataclasses import asdict

    from tests.parity.report import RESULTS, write_report

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        # A pytest-xdist worker holds only its share: it hands the results to the controller
        # (pytest_testnodedown below), which writes the one report.
        workeroutput["parity_results"] = [asdict(r) for r in RESULTS]
        return
    path = session.config.getoption("--parity-report")
    if path and RESULTS:
        write_report(path)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without xdist
def pytest_testnodedown(node, error):
    from tests.parity.report import RESULTS, ParityResult

    RESULTS.extend(ParityResult(**fields) for fields in getattr(node, "workeroutput", {}).get("parity_results", ()))
