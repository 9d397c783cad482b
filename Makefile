# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
MLFLOW_PORT ?= 5000
MLFLOW_STORE ?= $(CURDIR)

.PHONY: install browser demo serve mlflow-ui test test-fast clean help bench report screenshots

help:
	@echo "make demo   - install (once) and run the train-eval flow on the embedded digits dataset (no server)"
	@echo "make serve  - a local Prefect server on 127.0.0.1:4200 + the train-eval deployments (Ctrl-C stops both)"
	@echo "make mlflow-ui - the MLflow UI over this project's runs (mlflow.db, mlruns/) at http://127.0.0.1:5000"
	@echo "make test   - install (once, with chromium for the browser tests) and run the whole test suite (4 workers)"
	@echo "make test-fast - the unit tests alone (no servers, no Ray cluster, no pipeline run), a few minutes"
	@echo "make bench  - the maintained CPU benchmarks (benchmarks/run_all.py lists them), then make report"
	@echo "make report - rewrite the measured blocks of README.md, BENCHMARKS.md and docs/ from benchmarks/results/*.json"
	@echo "make screenshots - README's screenshots (docs/screenshots/) of the MLflow and Prefect pages, in headless chromium"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the pins change.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The headless browser of the UI tests (tests/test_browser.py) and `make screenshots`: Debian's chromium, a system
# package, installed with apt when missing and this runs as root. Elsewhere the browser tests fail and name it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed (not root: run apt-get install chromium); the browser tests will fail"; fi; }

# The main job: the train-eval Prefect flow in this process (fetch -> train_classifier -> train -> sample ->
# evaluate -> figures, sampler_table, each through `dvc repro`) on the embedded digits with params.yaml; Prefect
# starts a temporary local API, no server needed. Afterwards `dvc status` is clean and a second `make demo` or
# `dvc repro` reruns nothing.
demo: install
	$(PY) -m flows.train_eval

# A local Prefect server (SQLite under PREFECT_HOME) and prefect.yaml's deployments, served from this folder.
serve: install
	$(PY) -m flows.serve --start-server --port 4200

# The MLflow UI over the local tracking store the stages write by default; loopback only.
# MLflow's job runner (huey consumers, for server-side jobs this project does not use) is off: 2 processes and
# ~0.5 GiB instead of 10 and ~1.7 GiB (tests/test_tracking.py counts them).
mlflow-ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--workers 1 --backend-store-uri sqlite:///$(MLFLOW_STORE)/mlflow.db --default-artifact-root $(MLFLOW_STORE)/mlruns

# The suite on TEST_WORKERS processes (pytest-xdist). Tests sharing an expensive fixture stay on one worker
# (tests/xdist_groups.py). On 2 cores (Intel Xeon, 2026-12-07) `make test` took 12:56 with 3 workers and 13:23 with
# 2, which leave the cores idle while both wait on servers (1,512 and 1,405 busy CPU-s). With 4, more stages and Rays
# at once contend for the 2 cores and each takes more CPU: an earlier, heavier suite took 21.5-24.5 min with 4 against
# 18.5-21 with 3.
TEST_WORKERS ?= 3

test: install browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

# The unit tests alone: no servers, no Ray cluster, no pipeline run (`-m "not slow"`); a few minutes.
test-fast: install
	$(PY) -m pytest -m "not slow" -n 2 --dist loadgroup

# The maintained CPU benchmarks (benchmarks/run_all.py lists them: training and sampling vs diffusers, Ray Train's
# overhead; ~10 min on 2 cores), then `make report`; BENCH_DEMO=1 adds the whole demo (benchmark 5). diffusers is a
# runtime dependency (ddpm/solvers.py).
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.run_all

# Every measured block of README.md, BENCHMARKS.md and docs/*.md, rewritten from the records in benchmarks/results/
# (a second run changes nothing; `python -m benchmarks.report --check` names stale blocks without writing).
report: install
	$(PY) -m benchmarks.report

# README's screenshots of the MLflow run page, the compare view and the Prefect flow run page (docs/screenshots/),
# taken in headless chromium over this project's stores: mlflow.db/mlruns and the Prefect database of PREFECT_HOME.
screenshots: install browser
	$(PY) -m tools.screenshots --out docs/screenshots

clean:
	rm -rf .ray_results dvc_out
