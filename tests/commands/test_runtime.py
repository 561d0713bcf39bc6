"""The allocator setting the command line applies (rwcnet.runtime)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from rwcnet.runtime import ENVIRONMENT_SWITCH, keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
#: Script lines giving a subprocess glibc's malloc and free through ctypes.
_MALLOC = (
    "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
    "libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
    "libc.malloc.argtypes = [ctypes.c_size_t]\n"
)


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="needs glibc")
def test_large_blocks_stay_in_the_heap_after_the_call():
    # In a fresh process: with the setting, a freed 64 MB block is kept and handed out again at the same
    # address; by default glibc unmaps it on free and maps a new one (usually elsewhere), and the
    # process's mapping count shows it.
    script = (
        "import ctypes, ctypes.util, sys\n"
        "from rwcnet.runtime import keep_freed_memory\n"
        + _MALLOC +
        "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
        "def maps(): return sum(1 for _ in open('/proc/self/maps'))\n"
        "before = maps(); p = libc.malloc(64 << 20); during = maps(); libc.free(p)\n"
        "print(during - before)\n"
    )
    counts = {}
    for mode in ("keep", "default"):
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        counts[mode] = int(result.stdout.strip())
    assert counts["default"] >= 1  # a new mapping for the block
    assert counts["keep"] <= 0  # served from the heap: no new mapping


def test_cli_entry_point_applies_it(monkeypatch):
    import rwcnet.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(sys, "argv", ["rwcnet", "--version"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [True]


@pytest.mark.skipif(not GLIBC, reason="needs glibc")
def test_release_returns_kept_memory_to_the_system():
    # With freed memory kept, a freed 256 MB block that was touched stays resident until released.
    script = (
        "import ctypes, ctypes.util\n"
        "from rwcnet.runtime import keep_freed_memory, release_freed_memory\n"
        + _MALLOC +
        "def rss(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) >> 10\n"
        "assert keep_freed_memory()\n"
        "keep = libc.malloc(1 << 20)\n"  # a live block above the big one, so the heap top cannot simply shrink
        "big = libc.malloc(256 << 20); ctypes.memset(big, 1, 256 << 20)\n"
        "top = libc.malloc(1 << 20); libc.free(big); kept = rss()\n"
        "assert release_freed_memory()\n"
        "print(kept - rss())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(result.stdout.strip()) > 200  # MB returned

