import platform

import pytest

from decoders.host_memory import retain_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_every_setting_and_applies_once():
    # mallopt returns 0 for an out-of-range value (e.g. an mmap threshold above 32 MiB): all must take
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True
