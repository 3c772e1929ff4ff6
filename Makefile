# squib: the one entry point. `make` builds, `make test` runs everything CI runs.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build test unit-test lint fmt deps host-test vm-test arm64-vm-test guest-kernel test-initramfs guest-image bench demo macos

all: build

build:
	$(CARGO) build --workspace --all-targets

deps:
	scripts/install-deps

# Format check, clippy, rustdoc with warnings denied; squib-vmm with the HVF backend is
# type-checked for macOS, and the VMM and test crates the arm64 VM tests build for arm64 Linux
# (musl, the target they are built for: its pthread_t differs from glibc's, for one). The agent
# is linted for the host only: its libc conversions are needed on one libc and redundant on
# the other.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target aarch64-apple-darwin -p squib-hypervisor -p squib-devices -p squib-core -p squib-api -p squib-vmm --all-targets -- -D warnings
	$(CARGO) clippy --target aarch64-unknown-linux-musl -p squib-hypervisor -p squib-devices -p squib-core -p squib-api -p squib-vmm -p squib-tests --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --document-private-items
	@# The pattern is split in quotes so that this line does not match itself.
	@if git grep -nE '\b(TO''DO|FIX''ME|X''XX)\b' -- '*.rs' 'Makefile' '*.sh'; then \
		echo "lint: bare to-do markers (see STYLE) are not merged" >&2; exit 1; fi

# Host-side unit tests. The squib-tests crate is left out: its VM tests need a real KVM.
unit-test:
	$(CARGO) test --workspace --exclude squib-tests

# squib-tests' own unit tests and the VM test host tool's tests (they boot L1 from this host).
host-test:
	$(CARGO) test -p squib-tests --lib --bins --test 'host_*'

# VM tests (tests/tests/vm_*.rs): on this host's KVM if tests/vmhost's probe passes, else all
# of them inside one boot of the VM test host. Builds the guest kernel first if needed.
vm-test:
	$(CARGO) build -p containerd-shim-squib-v2
	tests/run-vm-tests
	tests/run-arm64-vm-tests

# Only the aarch64 VM tests: squib-vmm boots the arm64 guest image on an arm64 KVM (inside the
# arm64 VM test host on any other host) and vm_agent's cases run against it.
arm64-vm-test:
	tests/run-arm64-vm-tests

# The guest kernel (bzImage, then vmlinux: the last line is vmlinux's path) and the busybox
# test initramfs (the last line is its path).
guest-kernel:
	@guest-image/build-kernel

test-initramfs:
	@guest-image/test-initramfs

# The guest kernel and the agent initramfs, cached by content; also linked as
# ${SQUIB_CACHE:-~/.cache/squib}/guest/{vmlinux,initramfs}. The last two lines are their paths.
guest-image:
	@guest-image/build-guest-image

test: lint unit-test host-test vm-test

# squib side by side with runc and QEMU microvm (bench/run): prints a markdown table and writes
# target/bench/{results.json,results.md,chart.png}. Runs inside the VM test host when this
# host's KVM cannot run guests at hardware speed; there only the ratios mean something.
bench:
	bench/run

# Sets up a fresh machine and runs `uname -a` in a container in its own microVM through
# containerd (inside the VM test host when this host's KVM cannot run guests).
demo:
	scripts/demo

# On macOS on Apple Silicon: squib-vmm built and signed with the hypervisor entitlement
# (scripts/build-macos says what has and has not run on a Mac).
macos:
	scripts/build-macos

fmt:
	$(CARGO) fmt --all
