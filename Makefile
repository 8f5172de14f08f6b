# `make demo` and `make test` each build their own virtual environment on a fresh clone.
# TORCH pins the CPU build that lies on the project's machines; elsewhere pass your own,
# e.g. `make test TORCH='torch>=2.3'` (or install torch first and set TORCH=torch).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.deqhess-installed

DOCS_STAMP := $(VENV)/.deqhess-docs

.PHONY: demo test lint docs bench bench-extras clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# the curvature tools of the ecosystem tests (tests/ecosystem), each with --no-deps so
	# that pip never replaces the CPU torch: their declared torchvision (a CUDA torch behind
	# it) is imported by none of the code the tests use (only backpack.utils.examples); the
	# check fails loudly if pip ever replaced torch all the same
	$(BIN)/python -c "import torch; print(torch.__version__)" > $(VENV)/.torch-before
	$(BIN)/pip install --quiet --no-deps curvlinops-for-pytorch==3.0.1 \
		backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 laplace-torch==0.3 asdfghjkl==0.1a5 \
		torchmetrics==1.9.0 lightning-utilities==0.15.3 torchdeq==0.1.0
	$(BIN)/pip install --quiet einops einconv opt-einsum linear_operator typing_extensions
	$(BIN)/python -c "import torch; print(torch.__version__)" | cmp - $(VENV)/.torch-before
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deqhess demo --out deqhess-demo

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples docs
	$(BIN)/ruff format --check src tests benchmarks examples docs/*.py
	$(BIN)/mypy  # the modules [tool.mypy] lists

# the site in docs/_build/html: Sphinx (pages in Markdown through MyST, the API from the
# docstrings) and sphinx-gallery, which runs the examples and shows their plots. Warnings
# are errors. The docs extra is pure Python; the check fails loudly if pip ever replaced
# the CPU torch.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -c "import torch; print(torch.__version__)" > $(VENV)/.torch-before
	$(BIN)/pip install --quiet -e ".[docs]"
	$(BIN)/python -c "import torch; print(torch.__version__)" | cmp - $(VENV)/.torch-before
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	cd docs && OMP_NUM_THREADS=1 ../$(BIN)/sphinx-build -W --keep-going -b html . _build/html

# optional baselines for the benchmarks, never dependencies of deqhess (torchdeq needs only
# torch and numpy; --no-deps keeps pip from touching the CPU torch)
bench-extras: $(STAMP)
	$(BIN)/pip install --quiet --no-deps "torchdeq==0.1.0"
	# JAX + optimistix for benchmarks/vs_jax.py (none of them depends on torch); the check
	# fails loudly if pip ever replaced the CPU torch
	$(BIN)/python -c "import torch; print(torch.__version__)" > $(VENV)/.torch-before
	$(BIN)/pip install --quiet -e ".[bench]"
	# the other curvature tools of benchmarks/vs_curvlinops.py, each with --no-deps (their
	# torchvision and CUDA-torch requirements would replace the CPU torch) plus the light
	# pure-Python dependencies they import
	$(BIN)/pip install --quiet --no-deps "laplace-torch==0.3" "backpack-for-pytorch==1.7.1" \
		"unfoldNd==0.2.3" "asdfghjkl==0.1a5" "torchmetrics==1.9.0" "lightning-utilities==0.15.3" \
		"pyhessian==0.1" "hessian-eigenthings==1.0.0a5"
	$(BIN)/python -c "import torch; print(torch.__version__)" | cmp - $(VENV)/.torch-before

# every benchmark, one thread each (ratios against baselines measured in the same run; about
# 50 minutes here). The torchdeq, JAX, laplace-torch, PyHessian and hessian-eigenthings
# columns need `make bench-extras` and are skipped without it; vs_jax.py needs JAX.
bench: $(STAMP)
	cd benchmarks && export OMP_NUM_THREADS=1 \
		&& ../$(BIN)/python dense_hessian.py && ../$(BIN)/python hvp.py \
		&& ../$(BIN)/python conv_hvp.py && ../$(BIN)/python nn_memory.py \
		&& ../$(BIN)/python layer_training.py && ../$(BIN)/python forward_solvers.py \
		&& ../$(BIN)/python dataset_scale.py && ../$(BIN)/python vs_curvlinops.py \
		&& { ../$(BIN)/python -c "import optimistix" 2>/dev/null \
			&& ../$(BIN)/python vs_jax.py || echo "vs_jax.py skipped: make bench-extras"; }

clean:
	rm -rf $(VENV) deqhess-demo docs/_build docs/auto_examples docs/api/generated \
		docs/gen_modules docs/sg_execution_times.rst
