# bakedllama: the front door. `make help` lists the targets.
VENV    := .venv
PY      := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
BOARD   ?= ulx3s
PROMPT  ?= It was
SIM_PORT ?= 4321

.PHONY: help setup demo test test-all weights target build load sim report bench bench-extra lint clean

help:       ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:      ## apt packages, .venv and pinned PyPI packages (idempotent)
	@bash scripts/setup.sh

demo: setup ## the quick start: generate from a prompt on the Verilator SoC (built once, cached)
	$(VENV)/bin/bakedllama generate "$(PROMPT)" --max-tokens 48

test: setup ## default + Verilator (sim) tests
	$(PY) -m pytest -q -m "not slow"

test-all: setup ## everything, including bitstream builds (slow)
	$(PY) -m pytest -q

weights:    ## train the tiny model (torch, ~40 min on 2 cores), bake and evaluate it
	@EXTRAS=dev,train bash scripts/setup.sh
	$(PY) -m weights.train --out weights/tiny $(if $(CORPUS),--corpus $(CORPUS))
	$(PY) -m weights.quantize --dir weights/tiny --compare $(if $(CORPUS),--corpus $(CORPUS))

target:     ## train the speculative-decoding target (8.3x the baked model; ~35 min on 2 idle cores (1.0 s per step measured), 76 min here busy; resumable)
	@EXTRAS=dev,train bash scripts/setup.sh
	$(PY) -m weights.train --preset target --threads $(or $(THREADS),2) --resume --eval-every 250

build:      ## bitstream for BOARD (ulx3s) with yosys/nextpnr/ecppack from PyPI; prints utilisation, Fmax. BOARD=sqrl_acorn: PCIe gateware + Vivado scripts (ESTIMATE=1: yosys resource estimate)
	$(PY) -m soc.$(BOARD) --build $(if $(MODEL),--model $(MODEL)) $(if $(ESTIMATE),--estimate)

load:       ## program the board with openFPGALoader (SRAM; FLASH=1 writes the SPI flash)
	$(PY) -m soc.$(BOARD) --load $(if $(FLASH),--flash)

sim:        ## the simulated SoC on socket://127.0.0.1:$(SIM_PORT) for other clients (Ctrl-C stops it)
	$(PY) -m bakedllama.device --port $(SIM_PORT)

report:     ## utilisation, Fmax and token rates of the last `make build`
	@cat build/soc/$(BOARD)/report.json

bench: setup ## performance figures against their bounds (prints, never asserts)
	$(PY) scripts/bench.py

bench-extra: ## llama.cpp for bench's side-by-side: setup with the bench extra (llama-cpp-python compiled for this CPU, ~10-30 min; LLAMA_CMAKE_ARGS overrides -DGGML_NATIVE=ON)
	CMAKE_ARGS="$(or $(LLAMA_CMAKE_ARGS),-DGGML_NATIVE=ON)" CMAKE_BUILD_PARALLEL_LEVEL=$(or $(JOBS),2) EXTRAS=dev,bench nice bash scripts/setup.sh

lint:       ## ruff on host/, weights/, tests/
	$(VENV)/bin/ruff check host weights tests scripts

clean:      ## remove build output (keeps .venv and the checked-in weights)
	rm -rf build .pytest_cache .ruff_cache
