# cuda.mk - the CUDA backend's build, included from the Makefile. `make CUDA=1` (use a build
# folder of its own: make CUDA=1 BUILD=build-cuda) compiles src/backend/cuda/*.cu with nvcc for
# sm_90a (H100/H200 machine code with the Hopper-only wgmma the bf16 attention uses) plus
# compute_90 PTX that other GPUs JIT-compile (without wgmma: the mma.sync kernels run there), adds the objects
# to libqfuse, links the CUDA runtime (static, so the library needs no libcudart.so at run time)
# and cuBLAS, and defines QF_HAVE_CUDA for every C file (src/backend/dispatch.c then routes calls
# whose tensors are in GPU memory to the CUDA backend).
#
# Invariant: without CUDA=1 this file adds nothing; the default build stays CPU-only and needs
# no CUDA toolkit. The toolkit only has to be present to compile: no GPU is needed to build.
#
#   make CUDA=1 BUILD=build-cuda                        CUDA_HOME=/usr/local/cuda by default
#   make CUDA=1 CUDA_GENCODE="-gencode=arch=compute_80,code=sm_80"   other targets
ifeq ($(CUDA),1)
CUDA_HOME    ?= /usr/local/cuda
NVCC         ?= $(CUDA_HOME)/bin/nvcc
CUDA_GENCODE ?= -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=compute_90
NVCCFLAGS    ?= -O3 -lineinfo
CUDA_SRC     := $(sort $(wildcard src/backend/cuda/*.cu))
CUDA_OBJ     := $(CUDA_SRC:%.cu=$(BUILD)/%.o)
LIB_OBJ      += $(CUDA_OBJ)
override CFLAGS += -DQF_HAVE_CUDA
LDLIBS       += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcublasLt -lcudart_static -lrt -ldl -lpthread -lstdc++

$(BUILD)/%.o: %.cu $(wildcard src/backend/cuda/*.h src/backend/cuda/*.cuh include/*.h src/*/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) $(CUDA_GENCODE) $(NVCCFLAGS) -std=c++17 -Xcompiler -fPIC,-Wall,-Wextra,-Wno-unused-parameter \
	  -DQF_HAVE_CUDA -Iinclude -Isrc -Isrc/core -c $< -o $@
endif
