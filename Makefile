# Two commands do all the set-up:  `make demo` (the main job) and `make test`.
# Both create .venv and install what they need. torch is pinned to the CPU wheel
# here; for a GPU install see the README ("GPU install").
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Private torch APIs in use, checked against this pin (re-check them when it moves):
#   torch.distributed._state_dict_utils._copy_state_dict / _create_cpu_state_dict
#   (engine/checkpoint.py: async checkpoint staging into reused CPU buffers; torch's own
#   async_save uses them; a failure there falls back to reallocating the buffers).
TORCH ?= torch==2.13.0
EXTRAS ?= sim,parquet,hf,gguf,tb,test

.PHONY: install kernels demo test test-all lint bench clean mutation

# torch (and ninja, which builds the CPU kernels) first: `.ci/run` starts the kernel builds as soon
# as they are in, while the rest installs.
$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" "ninja>=1.11"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# exaflop's CPU kernels (nn/csrc) build on first use (~20 s on 2 cores); this builds them now, for
# this CPU and for it capped to AVX2 (what the AVX2 tests and benchmarks run).
# They need only torch and ninja (src/ on the path), so they can build while the other packages install.
kernels: $(VENV)/.torch
	PYTHONPATH=src $(PY) -c "from exaflop.nn.kernels import main; raise SystemExit(main())"
	PYTHONPATH=src MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
		$(PY) -c "from exaflop.nn.kernels import main; raise SystemExit(main())"

# The fleet-scale tests (Ray cluster, S3 server) need the ray and s3 extras; the default
# install, and so `make demo`, does not pull them.
# One pip run for everything when nothing is installed yet (CI): one resolve, not two.
$(VENV)/.fleet: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[$(EXTRAS),ray,s3]"
	touch $(VENV)/.installed $@

demo: install
	$(VENV)/bin/exaflop demo

# torch.compile stays off in the default run (tests marked `compile`; make test-all has them).
test: install $(VENV)/.fleet
	$(VENV)/bin/ruff check src tests bench tools
	# Two workers, whole files each (module fixtures stay shared), most of the time waiting on
	# subprocesses (servers, torchrun groups); files go out heaviest first (tests/conftest.py).
	$(PY) -m pytest -q -m "not compile" -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# Everything, including the llama.cpp round trip (compiles llama.cpp: ~15 minutes on 2 cores).
test-all: install $(VENV)/.fleet
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install -q -e ".[$(EXTRAS),llamacpp]"
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check src tests bench tools

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs data

# Mutation testing (not in CI: minutes per module). The module and its tests are set in
# pyproject.toml [tool.mutmut]; results and every survivor are in docs/testing.md.
mutation: install
	$(PIP) install -q mutmut==3.8.1
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/mutmut results
	# What mutmut cannot map to a test: code run only by the servers the tests start, and the
	# loader's pooled path that runs in DataLoader workers. A seeded sample, run for real.
	$(PY) tools/mutation_sample.py --module exaflop.serve.api --sample 20 tests/serve/test_serve_openai.py
	$(PY) tools/mutation_sample.py --module exaflop.serve.drive --sample 20 tests/serve/test_serve_drive.py
	$(PY) tools/mutation_sample.py --module exaflop.data.stream --pool survived --only MicroBatches \
		--sample 40 tests/data/test_stream.py
