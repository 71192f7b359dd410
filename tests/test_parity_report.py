"""The parity report under pytest-xdist: each worker hands its results to the controller, which writes one
report with all of them (without the hand-over, the last worker's share overwrote the others)."""

from types import SimpleNamespace

import tests.conftest as conftest
from tests.parity import report
from tests.parity.report import ParityResult


def _result(case: str) -> ParityResult:
    return ParityResult(device="cpu", backend="sdpa", case=case, status="pass", ratio=0.5, detail="")


def test_workers_hand_their_results_to_the_controller_which_writes_them_all(monkeypatch, tmp_path):
    shares = [[_result("a"), _result("b")], [_result("c")]]
    nodes = []
    for share in shares:  # each worker's session finishes with its own share of the results
        monkeypatch.setattr(report, "RESULTS", list(share))
        worker = SimpleNamespace(config=SimpleNamespace(workeroutput={}))
        conftest.pytest_sessionfinish(worker, 0)
        nodes.append(SimpleNamespace(workeroutput=worker.config.workeroutput))
    controller_results = []
    monkeypatch.setattr(report, "RESULTS", controller_results)
    for node in nodes:
        conftest.pytest_testnodedown(node, None)
    assert [r.case for r in controller_results] == ["a", "b", "c"]
    path = tmp_path / "parity.md"
    options = {"--parity-report": str(path)}
    controller = SimpleNamespace(config=SimpleNamespace(getoption=options.get))
    monkeypatch.setattr(report, "write_report", lambda p, results=controller_results: written.append((p, results)))
    written = []
    conftest.pytest_sessionfinish(controller, 0)
    assert written == [(str(path), controller_results)]
