# evalkit: `make report` (installs into .venv if needed, then the demo report) and `make test`.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
CONFIG  ?= configs/demo.yaml
OUT     ?= reports/out/demo
DEMO    := configs/demo.yaml
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo-models report test bench bench-extract docker clean

help:  ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: CONFIG=$(CONFIG) OUT=$(OUT)"

INSTALL_LOG := $(VENV)/install.log

# One line per step on the terminal; pip's full output goes to $(INSTALL_LOG), and its tail is
# shown when a step fails.
$(VENV)/.installed: pyproject.toml constraints.txt
	@mkdir -p $(VENV) && : > $(INSTALL_LOG)
	@echo "install: creating $(VENV) (full log: $(INSTALL_LOG))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) >> $(INSTALL_LOG) 2>&1 || { tail -n 30 $(INSTALL_LOG); exit 1; }
	@echo "install: upgrading pip"
	@$(PY) -m pip install --upgrade pip >> $(INSTALL_LOG) 2>&1 || { tail -n 30 $(INSTALL_LOG); exit 1; }
	@echo "install: evalkit with its test extras (torch and torchvision pinned by constraints.txt; a few minutes the first time)"
	@$(PY) -m pip install -c constraints.txt -e '.[test]' >> $(INSTALL_LOG) 2>&1 || { echo "install: pip failed; the end of $(INSTALL_LOG):"; tail -n 30 $(INSTALL_LOG); exit 1; }
	@$(PY) -c "import evalkit, torch; print(f'install: done (evalkit {evalkit.__version__}, torch {torch.__version__})')"
	@touch $@

install: $(VENV)/.installed  ## create .venv and install evalkit with its test extras (torch pinned by constraints.txt)

demo-models: install  ## train the demo's models once (cached in runs/demo/)
	$(PY) -m evalkit.demo $(DEMO)

report: install  ## write a report: CONFIG=... OUT=... (default: the embedded digits demo)
	@if [ "$(CONFIG)" = "$(DEMO)" ]; then $(PY) -m evalkit.demo $(DEMO); fi
	@$(VENV)/bin/evalkit report $(CONFIG) --out $(OUT)

test: install  ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install  ## the judged speed scenarios (tiny, demo, 10k vs textbook, 70k vs openTSNE) -> bench-results/judged.json (not part of test; about 10 min)
	$(PY) benchmarks/bench.py --judged --out bench-results/judged.json

bench-extract: install  ## images/s of a ResNet-50 through evalkit's extraction (CPU; CUDA modes when present)
	$(PY) benchmarks/extract_throughput.py

docker:  ## build the CUDA image (needs a Docker engine)
	docker build -t evalkit .

clean:  ## remove reports, caches and demo checkpoints (keeps .venv)
	rm -rf reports/out .evalkit-cache runs/demo
