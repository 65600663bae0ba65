# The two commands a newcomer needs: `make run` and `make test`. Everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VERSION ?= $(shell $(PYTHON) -c "import re;print(re.search(r'__version__ = \"(.+)\"', open('app/__init__.py').read()).group(1))")
IMAGE ?= kandinsky-serving
PORT ?= 8080
MODEL ?= kandinsky
TINY := model_store/tiny

.PHONY: run test test-long install lint typecheck pytest tiny generate weights verify docker-build bench-decode bench-decode-profile bench-gpu bench-load bench-throughput clean

## run: install if needed, build the tiny random-weight model if missing, serve it on :8080 on the CPU
run: $(VENV)/.installed $(TINY)/model.json
	$(PY) -m app --model_name kandinsky --model_dir $(TINY) --http_port $(PORT) --device cpu --dtype fp32

## test: install if needed, lint, type-check and run the test suite (all but the `long` tests; < 15 min on 2 cores)
test: $(VENV)/.installed
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -m "not long"

## test-long: the `long` tests (about 10 min on 2 cores); CI runs them after `make test`
test-long: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m long

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt scripts/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	scripts/install.sh $(PY) --dev
	touch $@

tiny: $(TINY)/model.json
$(TINY)/model.json: app/tools/tiny.py | $(VENV)/.installed
	$(PY) -m app.tools.tiny $(TINY)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/hadolint Dockerfile
typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

## generate: offline generation, e.g. make generate QUERY="синий кот" ARGS="--images_to_gen 4"
generate: $(VENV)/.installed $(TINY)/model.json
	$(PY) -m app.tools.generate --model_dir $(or $(MODEL_DIR),$(TINY)) --query "$(QUERY)" --out out $(ARGS)

## weights: download the real weights of MODEL (kandinsky|malevich) into model_store/MODEL
weights: $(VENV)/.installed
	$(PY) -m app.tools.weights download $(MODEL) --dest model_store/$(MODEL)
verify: $(VENV)/.installed
	$(PY) -m app.tools.weights verify model_store/$(MODEL)

## docker-build: the serving image, $(IMAGE):<version>, with BuildKit. Behind a TLS-re-signing proxy give
## pip its CA bundle as the build secret pip_ca: make docker-build PIP_CA=/etc/ssl/certs/ca-certificates.crt
## (and BUILD_NETWORK=host where the daemon has no bridge network, as `make docker-test` starts it)
# Debian's docker.io client (/usr/bin/docker) has BuildKit built in; a newer CLI needs its buildx plugin.
DOCKER ?= $(if $(wildcard /usr/bin/docker),/usr/bin/docker,docker)
PIP_CA ?=
BUILD_NETWORK ?=
DOCKER_COMMA := ,
DOCKER_BUILD_FLAGS = $(if $(BUILD_NETWORK),--network $(BUILD_NETWORK)) --build-arg VERSION=$(VERSION) \
	--build-arg REVISION=$(or $(shell git rev-parse HEAD 2>/dev/null),unknown) \
	--build-arg SOURCE_URL=$(or $(shell git config --get remote.origin.url 2>/dev/null),unknown) \
	$(if $(PIP_CA),--secret id=pip_ca$(DOCKER_COMMA)src=$(PIP_CA))
docker-build:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(DOCKER_BUILD_FLAGS) -t $(IMAGE):$(VERSION) .

## docker-build-volta: the V100 image: the newest torch whose wheels still ship sm_70 (CUDA 13 has none)
.PHONY: docker-build-volta
docker-build-volta:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(DOCKER_BUILD_FLAGS) -t $(IMAGE)-volta:$(VERSION) \
		--build-arg TORCH_PIN=torch==2.10.0 \
		--build-arg TORCHVISION_PIN=torchvision==0.25.0 .

## docker-test: build the image and run it for real on the tiny model (SPEC section 13; as root: starts
## a Docker daemon when none answers and makes debian:bookworm-slim when absent; leaves nothing behind)
.PHONY: docker-test
docker-test: $(TINY)/model.json
	$(PYTHON) scripts/docker_test.py --image $(IMAGE) --model_dir $(TINY)

## fuzz: schemathesis against a real server on the tiny model (also part of make test)
.PHONY: fuzz
fuzz: $(VENV)/.installed
	$(VENV)/bin/pytest -q tests/serving/test_openapi_fuzz.py

## bench-decode: ours against the published rudalle 1.1.3 (installed on demand into .venv-bench)
bench-decode: $(VENV)/.installed
	$(PY) bench/decode.py --threads 2 --runs 3 --out out/bench-decode.json
bench-decode-profile: $(VENV)/.installed
	$(PY) bench/decode.py --threads 2 --profile
## bench-gpu: on an H100/H200: ms per decode step at batch 1/8/16/32, fraction of the bandwidth bound
bench-gpu: $(VENV)/.installed
	$(PY) bench/gpu_decode.py --out out/gpu_decode
## bench-image-prompt: image completion against rudalle 1.1.3's ImagePrompts + generate_images (greedy)
.PHONY: bench-image-prompt
bench-image-prompt: $(VENV)/.installed
	$(PY) bench/image_prompt_parity.py --mode all --out out/image-prompt-parity.json
## bench-preview: what previews cost a 16-image job asking one every image row (tiny model, CPU)
.PHONY: bench-preview
bench-preview: $(VENV)/.installed $(TINY)/model.json
	$(PY) bench/preview.py --model_dir $(TINY) --every 1 --images 16 --runs 3 --out out/bench-preview.json
## bench-invariance: what batch invariance costs per decode step at batch 1..16, and that it holds (CPU)
.PHONY: bench-invariance
bench-invariance: $(VENV)/.installed
	$(PY) bench/batch_invariance.py --runs 3 --out out/bench-batch-invariance.json
## bench-continuous: continuous batching against batch at a time through real servers: A with B sent at
## T/4 and three concurrent requests (8 layers, hidden 256), then a Poisson trace at three loads (tiny model)
.PHONY: bench-continuous
bench-continuous: $(VENV)/.installed
	$(PY) bench/continuous_batching.py --layers 8 --hidden 256 --requests 0 --out out/bench-continuous-8x256.json
	$(PY) bench/continuous_batching.py --requests 12 --out out/bench-continuous-tiny.json
## bench-redis: what the Redis queue adds to a request's latency, and its round trips per request
.PHONY: bench-redis
bench-redis: $(VENV)/.installed
	$(PY) bench/redis_queue.py --requests 300 --out out/bench-redis-queue.json
## bench-fairness: a small tenant's wait behind a large one's backlog, fair queue against first in, first out
.PHONY: bench-fairness
bench-fairness: $(VENV)/.installed
	$(PY) bench/fairness.py --backlog 6 --out out/bench-fairness.json
bench-load: $(VENV)/.installed
	$(PY) bench/load.py
bench-throughput: $(VENV)/.installed
	$(PY) bench/throughput.py --url http://127.0.0.1:$(PORT)

clean:
	rm -rf $(TINY) out .pytest_cache .mypy_cache .ruff_cache .venv-bench
