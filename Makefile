# The two commands of README.md. Both set up everything they need on a fresh Debian machine (as root).
.PHONY: setup test demo lint format clean

setup:
	bash scripts/setup.sh

# pytest exits 5 when it collected no tests: make treats any non-zero exit as failure, so that fails too.
test: setup
	.venv/bin/ruff check udpflannel tests perf
	.venv/bin/ruff format --check udpflannel tests perf
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/udpflannel lab demo

lint: setup
	.venv/bin/ruff check udpflannel tests perf
	.venv/bin/ruff format --check udpflannel tests perf

format: setup
	.venv/bin/ruff format udpflannel tests perf
	.venv/bin/ruff check --fix udpflannel tests perf

clean:
	rm -rf .venv .pytest_cache .ruff_cache .hypothesis
