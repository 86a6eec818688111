"""conftest.py - makes `import qfuse` and `import util` work from any working directory (the
package is python/ of this repository; the library is $QFUSE_LIBRARY or build/libqfuse.so, found
by qfuse itself) and restores qfuse's global settings (ISA, threads) after every test, so a test
that forces a kernel path cannot leak it into the next one. Builds nothing."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.normpath(os.path.join(HERE, "..", "..", "python")), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import qfuse  # noqa: E402


def pytest_report_header(config):
    return "qfuse library: %s (isa %s, %d threads)" % (
        qfuse._native.library_path, qfuse.get_isa(), qfuse.get_num_threads())


@pytest.fixture(autouse=True)
def _restore_qfuse_globals():
    isa, threads = qfuse.get_isa(), qfuse.get_num_threads()
    yield
    qfuse.set_isa(isa)
    qfuse.set_num_threads(threads)
