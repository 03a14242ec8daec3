# provhpc: `make demo` and `make test` do all their own set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.provhpc-installed
TORCH ?= torch==2.13.0
NP ?= 4

.PHONY: venv demo test test-unit test-mpi test-slurm test-multinode bench clean lint

venv: $(STAMP)

# provhpc/capture/_fast.c: an edited C hot path is rebuilt (in place, by the editable install)
$(STAMP): pyproject.toml provhpc/capture/_fast.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all]' '$(TORCH)'
	$(BIN)/python -c "import provhpc, mpi4py, h5py, zmq"
	$(BIN)/python -c "import provhpc.capture.api as a; print('provhpc: C hot path', 'built' if a._fast else 'NOT built (no compiler?): the pure-Python path runs')"
	test -x $(BIN)/mpiexec
	touch $(STAMP)

demo: venv
	$(BIN)/mpiexec -n $(NP) $(BIN)/provhpc run --out provenance -- $(BIN)/python examples/train_mlp.py --epochs 3
	$(BIN)/provhpc summary provenance

test: venv
	bash tests/run.sh

test-unit: venv
	bash tests/run.sh unit

test-mpi: venv
	bash tests/run.sh mpi

test-slurm: venv
	bash tests/run.sh slurm

test-multinode: venv
	bash tests/run.sh multinode

bench: venv
	$(BIN)/python benchmarks/capture_cost.py

clean:
	rm -rf provenance data checkpoints build *.egg-info
