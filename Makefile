# qfuse build. `make` builds the library (static + shared), the CLI and the benchmark;
# `make test` builds and runs every test (unit, Python against PyTorch, sanitizers, fuzzers).
#
#   make PORTABLE=1     no -march=native (SIMD kernels are still chosen at run time)
#   make BLAS=blis      link BLIS instead of OpenBLAS (see docs/blas.md for the measurement)
#   make OPENBLAS_VARIANT=pthread   OpenBLAS's pthread build instead of its OpenMP build
#   make test FUZZ_SECONDS=60

CC      ?= cc
PYTHON  ?= /usr/bin/python3
BUILD   ?= build
BLAS    ?= openblas
FUZZ_SECONDS ?= 15

ifeq ($(PORTABLE),1)
ARCHFLAGS := -march=x86-64 -mtune=generic
else
ARCHFLAGS := $(shell $(CC) -march=native -E -x c /dev/null >/dev/null 2>&1 && echo -march=native)
endif

WARN    := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wno-unused-parameter
CFLAGS  ?= -O2 -g
override CFLAGS += -std=c11 -D_GNU_SOURCE -fPIC -fopenmp $(ARCHFLAGS) $(WARN) -Iinclude -Isrc -Isrc/core
# OpenBLAS's OpenMP build by default: its GEMM threads are the same OpenMP pool as qfuse's own
# parallel loops. With the pthread build the two pools spin against each other between calls
# (measured: BLIP-2 Q-Former forward B=1, 2 threads, 323 ms pthread vs 93 ms OpenMP; see
# docs/blas.md). The library is linked by path with an RPATH so the system's libopenblas.so.0
# alternative (often the pthread build) is not picked up instead.
OPENBLAS_VARIANT ?= openmp
ifeq ($(BLAS),blis)
BLAS_CFLAGS := -isystem /usr/include/x86_64-linux-gnu/blis-openmp -DQF_BLAS_BLIS
BLAS_LIBS   := -lblis
else
BLAS_DIR    := /usr/lib/x86_64-linux-gnu/openblas-$(OPENBLAS_VARIANT)
BLAS_CFLAGS := -I/usr/include/x86_64-linux-gnu/openblas-$(OPENBLAS_VARIANT)
BLAS_LIBS   := -L$(BLAS_DIR) -Wl,-rpath,$(BLAS_DIR) -lopenblas
endif
override CFLAGS += $(BLAS_CFLAGS)
LDLIBS  := -lcjson -lpcre2-8 -lutf8proc -lstb $(BLAS_LIBS) -lm -fopenmp

LIB_SRC := $(sort $(wildcard src/core/*.c src/io/*.c src/ops/*.c src/models/*.c src/backend/*.c src/train/*.c))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_SRC := $(sort $(wildcard src/cli/*.c))
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_SRC := $(sort $(wildcard tests/c/test_*.c))
TEST_BIN := $(TEST_SRC:tests/c/%.c=$(BUILD)/tests/%)
FUZZ_SRC := $(sort $(wildcard fuzz/fuzz_*.c))
-include cuda.mk

.PHONY: all test test-c test-python sanitize fakedev fuzz bench bench-qformer bench-llm clean
all: $(BUILD)/libqfuse.a $(BUILD)/libqfuse.so $(BUILD)/qfuse $(BUILD)/bench_attention $(BUILD)/bench_qformer

$(BUILD)/%.o: %.c $(wildcard include/*.h src/*/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libqfuse.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libqfuse.so: $(LIB_OBJ)
	$(CC) -shared $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/qfuse: $(CLI_OBJ) $(BUILD)/libqfuse.a
	$(CC) $(CFLAGS) -o $@ $(CLI_OBJ) $(BUILD)/libqfuse.a $(LDLIBS)

$(BUILD)/bench_attention: bench/bench_attention.c $(BUILD)/libqfuse.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libqfuse.a $(LDLIBS)

$(BUILD)/bench_qformer: bench/bench_qformer.c $(BUILD)/libqfuse.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libqfuse.a $(LDLIBS)

$(BUILD)/tests/%: tests/c/%.c $(wildcard tests/c/*.h) $(BUILD)/libqfuse.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/c -o $@ $< $(BUILD)/libqfuse.a $(LDLIBS)

# ---- tests -------------------------------------------------------------------------------
test-c: $(TEST_BIN)
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; $$t; done

test-python: $(BUILD)/libqfuse.so
	QFUSE_LIBRARY=$(abspath $(BUILD)/libqfuse.so) PYTHONPATH=python $(PYTHON) -m pytest -q tests/python

# The same C and Python tests under AddressSanitizer + UndefinedBehaviorSanitizer.
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
sanitize:
	$(MAKE) BUILD=build-san CFLAGS="-O1 -g $(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" build-san/libqfuse.so test-c-san
	ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	  QFUSE_LIBRARY=$(abspath build-san/libqfuse.so) QFUSE_TEST_QUICK=1 PYTHONPATH=python $(PYTHON) -m pytest -q -x tests/python
test-c-san: $(TEST_BIN)
	@set -e; for t in $(TEST_BIN); do echo "== $$t (asan+ubsan)"; $$t; done

# The models' GPU code paths (placement, input staging, planned device blocks, device gradients)
# on a stand-in device that is host memory (src/backend/fake_device.c, -DQF_FAKE_DEVICE), under
# ASan/UBSan: host-side memory errors of that code show without a GPU (tests/python/fakedev.py).
FAKEDEV_TESTS := $(addprefix tests/python/test_cuda_,qformer.py qformer_backward.py kvprefix.py kvprefix_backward.py \
  prefusion_backward.py vision.py vision_backward.py mha.py act16.py modality.py)
fakedev:
	$(MAKE) BUILD=build-fakedev CFLAGS="-O1 -g $(SAN_FLAGS) -DQF_FAKE_DEVICE" LDFLAGS="$(SAN_FLAGS)" build-fakedev/libqfuse.so
	ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	  QFUSE_LIBRARY=$(abspath build-fakedev/libqfuse.so) QFUSE_TEST_QUICK=1 PYTHONPATH=python:tests/python \
	  $(PYTHON) -m pytest -q --capture=sys -p fakedev -p no:cacheprovider $(FAKEDEV_TESTS)

# libFuzzer targets, one per parser, each run for FUZZ_SECONDS from its seed corpus.
FUZZ_CC := clang
FUZZ_FLAGS := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -std=c11 -D_GNU_SOURCE -fopenmp -Iinclude -Isrc -Isrc/core $(BLAS_CFLAGS)
FUZZ_LIB_SRC := $(filter-out src/ops/% src/models/% src/backend/%,$(LIB_SRC)) src/models/lora.c
fuzz:
	@mkdir -p build-fuzz
	@set -e; for f in $(FUZZ_SRC); do n=$$(basename $$f .c); \
	  echo "== $$n ($(FUZZ_SECONDS) s)"; \
	  $(FUZZ_CC) $(FUZZ_FLAGS) -o build-fuzz/$$n $$f $(FUZZ_LIB_SRC) $(LDLIBS); \
	  mkdir -p build-fuzz/corpus-$$n; \
	  if ! build-fuzz/$$n -max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
	    build-fuzz/corpus-$$n fuzz/corpus/$${n#fuzz_} > build-fuzz/$$n.log 2>&1; then \
	    tail -n 40 build-fuzz/$$n.log; echo "fuzz: $$n FAILED (log: build-fuzz/$$n.log)"; exit 1; fi; \
	  tail -n 1 build-fuzz/$$n.log; done

test: all test-c test-python sanitize fakedev fuzz
	@echo "all tests passed"

bench: all
	sh bench/run.sh

# Whole models (BLIP-2 Q-Former, AffectGPT pre-fusion) against PyTorch; THREADS=N to choose.
bench-qformer: $(BUILD)/bench_qformer
	$(BUILD)/bench_qformer $(if $(THREADS),--threads $(THREADS)) --python $(PYTHON)

# Decoder LLM per weight format (f32/bf16/int8/q4), bench/bench_llm.c: FOLDER=<HF llama/qwen2
# folder> [THREADS=N] [ARGS="--kernels ..."]; bench/llm_peer.py makes a random Qwen2 folder.
$(BUILD)/bench_llm: bench/bench_llm.c $(BUILD)/libqfuse.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libqfuse.a $(LDLIBS)

bench-llm: $(BUILD)/bench_llm
	$(BUILD)/bench_llm $(or $(FOLDER),$(error bench-llm: set FOLDER=<model folder>)) $(if $(THREADS),--threads $(THREADS)) $(ARGS)

# The bundled demo: models/default (a tiny BLIP-2 with RANDOM weights: the words mean nothing)
# describing data/chelsea.png, streamed. Any BLIP-2 folder / image / prompt:
#   make run RUN_MODEL=blip2-opt-2.7b RUN_IMAGE=cat.jpg RUN_PROMPT="Question: what is this? Answer:"
RUN_MODEL  ?= models/default
RUN_IMAGE  ?= data/chelsea.png
RUN_PROMPT ?= Question: what is in the picture? Answer:
.PHONY: run
run: $(BUILD)/qfuse
	$(BUILD)/qfuse run $(RUN_MODEL) --image $(RUN_IMAGE) --prompt "$(RUN_PROMPT)" --repetition-penalty 1.3

clean:
	rm -rf build build-san build-fuzz
