"""Run a script as a user whom file permissions bind: `python tests/as_plain_user.py SCRIPT ARGS...`.

root ignores a folder's missing write permission (CAP_DAC_OVERRIDE), so a test that makes a
folder read-only with chmod would not see what a user sees. Run as root, this drops the two
capabilities that bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) with capset(2)
and then runs SCRIPT as its __main__; run as anyone else, it just runs SCRIPT.
"""

import ctypes
import os
import runpy
import sys

if os.geteuid() == 0:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capget(ctypes.byref(header), data) != 0:
        sys.exit(f"capget failed: errno {ctypes.get_errno()}")
    for word in data[:1]:  # capabilities 1 and 2 live in the first word
        for field in ("effective", "permitted", "inheritable"):
            setattr(word, field, getattr(word, field) & ~0b110)
    if libc.capset(ctypes.byref(header), data) != 0:
        sys.exit(f"capset failed: errno {ctypes.get_errno()}")

script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
