"""Child processes that die with storyc: Data-Juicer and a private Ray head run in a process group of their own
(so a Ctrl-C in the terminal reaches storyc, which ends them in order), and a watchdog thread in the child ends
that whole group the moment storyc is gone, however it went (SIGKILL, SIGHUP, a crash): it waits on a pipe whose
only writer is storyc, and the kernel closes it when storyc exits."""
from __future__ import annotations

import os
import subprocess
import sys

# Runs in the child: start the watchdog, then the target ("module:function" or "-m module").
BOOT = """\
import importlib, os, runpy, signal, sys, threading
fd = int(sys.argv.pop(1)); target = sys.argv.pop(1)
def watch():
    while os.read(fd, 1):
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)  # storyc is gone: this group (the child and its workers) goes too
threading.Thread(target=watch, daemon=True).start()
if target.startswith("-m"):
    sys.argv[0] = target[2:]
    runpy.run_module(target[2:], run_name="__main__", alter_sys=True)
else:
    module, func = target.split(":")
    sys.exit(getattr(importlib.import_module(module), func)())
"""


def spawn(target: str, args: list[str], **popen) -> subprocess.Popen:
    """Start ``python`` running ``target`` ("module:function", or "-mmodule" for `python -m module`) with ``args``,
    in a new session, tied to this process by the watchdog pipe."""
    r, w = os.pipe()  # both ends non-inheritable: only ``r`` is passed, ``w`` stays with storyc alone
    try:
        p = subprocess.Popen([sys.executable, "-c", BOOT, str(r), target, *args], pass_fds=(r,),
                             start_new_session=True, **popen)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    p.storyc_watchdog = w  # closed by ``release`` once the child has ended (or when storyc exits)
    return p


def release(p: subprocess.Popen) -> None:
    w = getattr(p, "storyc_watchdog", None)
    if w is not None:
        os.close(w)
        p.storyc_watchdog = None
