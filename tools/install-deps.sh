#!/bin/sh
# Installs what qfuse needs on Debian 12 (bookworm): the C toolchain, cJSON, OpenBLAS; and for
# tests and the benchmark's PyTorch column: numpy, PyTorch (Debian's 1.13, CPU), pytest, and
# clang with its libFuzzer runtime. Runs apt-get through sudo when not root.
set -eu
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PKGS="build-essential libcjson-dev libpcre2-dev libutf8proc-dev libstb-dev libopenblas-openmp-dev python3 python3-numpy python3-torch python3-pytest clang libclang-rt-14-dev"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install-deps: installing:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
else
    echo "install-deps: all present"
fi
