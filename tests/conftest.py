import os
import tempfile

import pytest
import torch

# torch.compile keeps compiled graphs on disk (/tmp/torchinductor_<user>) across processes, and its cache key
# does not cover a custom op's schema: after fastguide's op gained an argument, a graph compiled by an older
# checkout was replayed against the new op and failed. Each test session compiles into its own cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastguide-tests-inductor-"))

# Without a GPU the Triton kernels run in Triton's interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded, restoring the setting afterwards: on tiny tensors intra-op threads only
    add wake-ups, which stall badly on shared cores (a 250-step mixture loop went from 2.5 s to 70 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
