# Two entry points on a fresh machine: `make demo` (image + masks -> 3D with the shipped model)
# and `make test` (the whole test suite). Both create/use the local virtual environment .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.timi-installed

.PHONY: install demo test bench-smoke clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the pinned builds (CUDA wheels that run on the CPU too)
	$(PY) -m pip install -q -c constraints/ci.txt torch torchvision
	# Ray (tests/test_eval_ray.py) is not in [all]: a 80 MB wheel most users do not need
	$(PY) -m pip install -q -c constraints/ci.txt -e ".[all,dev,ray]"
	touch $(STAMP)

install: $(STAMP)

EXAMPLE := timi/assets/example
demo: $(STAMP)
	$(VENV)/bin/timi generate $(EXAMPLE)/image.png --masks $(EXAMPLE)/masks.png --out outputs/demo.glb \
		--split-instances --report outputs/demo-report --octree-resolution 128 --seed 0

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench-smoke: $(STAMP)
	$(PY) -m pytest -q tests/test_bench.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
