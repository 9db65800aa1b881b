# `make run` and `make test` are all a fresh machine needs: each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The TypeScript client's node_modules, as its package-lock.json pins them (protoc-gen-es too).
TS := clients/typescript
TS_DEPS := $(TS)/node_modules/.package-lock.json

.PHONY: run test bench lint typecheck protos-check protos-baseline gen pytest ts-test clean

run: $(STAMP)
	$(BIN)/credits serve

test: lint typecheck protos-check pytest ts-test

# The service against this machine's limits (pgbench, bare gRPC and ASGI echo servers); minutes, and
# never part of `make test`.
bench: $(STAMP)
	$(BIN)/python -m bench

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]' -e clients/python
	touch $@

gen: $(STAMP) $(TS_DEPS)
	$(BIN)/python tools/protogen.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy server tools bench
	$(BIN)/mypy clients/python/src

protos-check: $(STAMP) $(TS_DEPS)
	$(BIN)/buf lint
	$(BIN)/buf breaking --against $(API_BASELINE)
	$(BIN)/python tools/protogen.py --check

# The published API that `buf breaking` holds the protos to. Rewrite it only on purpose: every
# change it would accept breaks the generated clients of callers.
API_BASELINE := protos/breaking-baseline.binpb

protos-baseline: $(STAMP)
	$(BIN)/buf build --exclude-source-info -o $(API_BASELINE)

pytest: $(STAMP)
	$(BIN)/pytest -q

# The TypeScript client: its build, and its tests against a real `credits serve`.
$(TS_DEPS): $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund

ts-test: $(STAMP) $(TS_DEPS)
	cd $(TS) && npm run build && npm test

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
	rm -rf $(TS)/node_modules $(TS)/dist $(TS)/.test-build
