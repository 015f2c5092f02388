# CineVivid. Quick start on a fresh machine: `make run` (sets up, starts Ray + Serve on the
# embedded tiny model, generates a sample video) and `make test` (sets up, runs the fast tier of the
# tests); `make test-all` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel by default. On a GPU machine: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
OUT ?= out
PYTEST_ARGS ?=
USERS ?= 20
SPAWN_RATE ?= 5
RUN_TIME ?= 60s
LOCUST_ARGS ?=
CAPACITY_ARGS ?=
# the HTTP port of `make run` (default: serve_config.yaml's, 8000), e.g. make run PORT=8001
PORT ?=
# e.g. RUN_ARGS="--dashboard-host 0.0.0.0 --dashboard-port 8266" or RUN_ARGS=--no-dashboard (or --debug)
RUN_ARGS ?=

.PHONY: setup run stop test test-all loadtest capacity bench clean

# After the install: the torch asked for with TORCH= is the one installed (installed now when it
# differs), or it says loudly that it is not and fails.
setup: $(VENV)/.installed
	@$(BIN)/python -m serve.ops.torch_setup $(TORCH)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing pulls a multi-GB CUDA build on a CPU machine
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	@$(BIN)/python -m serve.ops.demo --out $(OUT) $(if $(PORT),--port $(PORT)) $(RUN_ARGS)

stop: setup
	$(BIN)/cinevivid down

# the fast tier: every layer end to end once, in a few minutes
test: setup
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

# the whole suite (what .ci/run runs)
test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Locust in its own process against a local stack it starts (or --host/--api-key in LOCUST_ARGS)
loadtest: setup
	$(BIN)/python -m loadtests.run_locust -u $(USERS) -r $(SPAWN_RATE) -t $(RUN_TIME) $(LOCUST_ARGS)

# Capacity report: open-loop job arrivals stepped up (jobs/min) until the service saturates; plot,
# step and per-route tables, saturation point and first saturating stage in loadtests/results/capacity/
# e.g. CAPACITY_ARGS="--start-jpm 15 --step-s 50" or "--host URL --api-key cv-... --ray-address HOST:6379"
capacity: setup
	$(BIN)/python -m loadtests.capacity $(CAPACITY_ARGS)

# CPU benchmarks; results in loadtests/results/ and the figures in loadtests/RESULTS.md
bench: setup
	$(BIN)/python -m loadtests.bench_overhead
	$(BIN)/python -m loadtests.bench_ingress
	$(BIN)/python -m loadtests.bench_batching

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
