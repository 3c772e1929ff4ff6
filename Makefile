# squib: the one entry point. `make` builds, `make test` runs everything CI runs.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build test unit-test lint fmt deps

all: build

build:
	$(CARGO) build --workspace --all-targets

deps:
	scripts/install-deps

# Format check, clippy, rustdoc with warnings denied; the HVF backend is type-checked for macOS.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --document-private-items
	@if git grep -nE '\b(TODO|FIXME|XXX)\b' -- '*.rs' 'Makefile' '*.sh'; then \
		echo "lint: bare TODO/FIXME/XXX markers are not merged" >&2; exit 1; fi

unit-test:
	$(CARGO) test --workspace

test: lint unit-test

fmt:
	$(CARGO) fmt --all
