"""Prints each benchmark table at the end of the run and saves it under bench/results/."""

import os

from bench.tables import render_all

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def pytest_terminal_summary(terminalreporter):
    tables = render_all()
    if tables:
        os.makedirs(RESULTS_DIR, exist_ok=True)
    for table, text in tables.items():
        terminalreporter.write_line("")
        for line in text.splitlines():
            terminalreporter.write_line(line)
        with open(os.path.join(RESULTS_DIR, f"{table}.md"), "w") as f:
            f.write(text)
