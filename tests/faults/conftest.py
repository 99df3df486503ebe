"""The faults suite's ledger, printed as one closing figure line after the tests."""
import pytest

LEDGER = {"runs": 0, "kills survived": 0, "bad inputs tried": 0, "samples lost": 0, "checkpoints lost": 0}


@pytest.fixture(scope="session")
def ledger() -> dict:
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    if any(LEDGER.values()):
        terminalreporter.write_line("faults suite: " + ", ".join(f"{k} {v}" for k, v in LEDGER.items()))
