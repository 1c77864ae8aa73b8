"""How every script runs: `cli.run_script(main, Args)` in each `__main__` parses the tyro Args,
turns bad input, a non-finite loss and failed file operations into one line `error: ...` (exit
code 1), and makes SIGINT / SIGTERM stop a training loop at its next chunk boundary with a
checkpoint (`STOP`, `stop_if_requested`; exit code 128 + the signal's number). A library user who
imports a stage and calls its `train` gets none of this.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Callable, Optional

from leq_utils.common import InputError


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: run_script prints "stopped by SIG...: <detail>" and exits with 128 + signum."""

    def __init__(self, signum: int, detail: str):
        super().__init__(f"stopped by {signal.Signals(signum).name}: {detail}")
        self.signum = signum


class StopRequest:
    """Set by run_script's signal handlers. While a training loop is `armed`, the first SIGINT or
    SIGTERM only sets `signum`, and the loop saves a checkpoint at its next chunk boundary and
    raises Interrupted; otherwise the signal raises Interrupted at once. A second signal, or one
    while the script exits, ends the process at once (`exit_now`)."""
    armed = False
    signum = 0
    stopping = False  # Interrupted was raised: the script is unwinding


STOP = StopRequest()


def stop_if_requested(saved: str, signum: Optional[int] = None) -> None:
    """At a training loop's chunk boundary, after saving: end the script if a signal asked to.
    `signum`: STOP.signum as the loop read it when it decided whether to save a checkpoint, so
    that the stop and the checkpoint agree (a signal that comes in between stops the loop at its
    next boundary, with that boundary's checkpoint); None reads it now."""
    signum = STOP.signum if signum is None else signum
    if signum:
        raise Interrupted(signum, f"{saved}; the same command resumes from it")


def exit_now(signum, frame=None):
    """A second signal (or one while the script exits): end the process now, in one line. Raising
    an exception here could land in a weakref callback or an atexit function, where Python prints
    it as a traceback and goes on. Every file is written atomically, so nothing is left half
    written; the last checkpoint (if any) is intact."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: the line below still goes out
            pass
    os.write(2, f"\nstopped by {signal.Signals(signum).name} at once: nothing was saved since the last checkpoint "
                f"(if any); the same command resumes from it\n".encode())
    os._exit(128 + signum)


def _while_exiting(signum, frame):
    """A signal after the script's work ended (its last line printed, files written): exit quietly
    with 128 + its number instead of a KeyboardInterrupt traceback from an atexit function."""
    os.write(2, f"stopped by {signal.Signals(signum).name} while exiting (the work had ended)\n".encode())
    os._exit(128 + signum)


def _on_signal(signum, frame):
    if STOP.signum or STOP.stopping:  # the second signal
        exit_now(signum)
    if STOP.armed:
        STOP.signum = signum
        os.write(1, f"\n[{signal.Signals(signum).name}] stopping at the next chunk boundary to save a checkpoint "
                    f"(send it again to stop at once)\n".encode())
        return
    STOP.stopping = True
    raise Interrupted(signum, "nothing was saved since the last checkpoint (if any); the same command resumes from it")


OS_ADVICE = {errno.ENOSPC: "free some disk space, then run the same command again (runs resume from their last checkpoint)",
             errno.EFBIG: "the file size limit (ulimit -f) was reached; raise it, then run the same command again",
             errno.EROFS: "the file system is read-only: write somewhere else (--run-dir / --out)",
             errno.EACCES: "no permission: write somewhere else (--run-dir / --out)",
             errno.EISDIR: "a folder is where a file should be: move it or choose another path",
             errno.ENOTDIR: "a file is where a folder should be: move it or choose another path"}


def os_error_message(e: OSError) -> str:
    """One line for a failed file operation: what failed, on which file, and what to do."""
    name = errno.errorcode.get(e.errno, "?") if e.errno else type(e).__name__
    where = f" {e.filename}" if e.filename else ""
    return f"{e.strerror or e} [{name}]:{where}; {OS_ADVICE.get(e.errno, 'check the file and the folder')}"


def parse_flags(args_type):
    """tyro.cli, with its error box (an unknown flag, a value that does not parse) turned into one
    line `error: ...` and exit code 2; --help prints as tyro prints it."""
    import contextlib
    import io
    import tyro
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        return tyro.cli(args_type)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            args = tyro.cli(args_type)
        sys.stderr.write(captured.getvalue())  # what tyro said while parsing well (a warning), as it said it
        return args
    except SystemExit as e:
        if not e.code:
            raise
        text = captured.getvalue()  # a box (a terminal) or plain lines under a title and rules of dashes
        lines = [l.strip().strip("│╭╮╰╯").strip(" ─") for l in text.splitlines()]
        lines = [l for l in lines if l and set(l) - set("─-") and not l.startswith("For full helptext")]
        lines = lines[:lines.index("Argument helptext:")] if "Argument helptext:" in lines else lines
        if len(lines) > 1 and ":" not in lines[0]:  # the title ("Unrecognized options", "Value error")
            lines = lines[1:]
        if not lines:
            lines = [f"bad command line (tyro exited with {e.code})"]
        after = lines[lines.index("Perhaps you meant:") + 1:] if "Perhaps you meant:" in lines else []
        guesses = [l.split()[0] for l in after if l.startswith("--")]
        prog = os.path.basename(sys.argv[0])
        print(f"error: {lines[0]}" + (f"; did you mean {' or '.join(guesses)}?" if guesses else "")
              + f"; python {prog} --help lists the flags", file=sys.stderr, flush=True)
        sys.exit(2)


def run_script(main: Callable, args_type) -> None:
    """Every script's `__main__`: install the SIGINT/SIGTERM handlers (see StopRequest), parse
    `args_type` with tyro and call `main` on it. Bad input (InputError), a non-finite loss
    (FloatingPointError), failed file operations (OSError: a full disk, a read-only folder, ...)
    and running out of memory (RESOURCE_EXHAUSTED) end the script with one line and exit code 1;
    a command line that does not parse with one line and exit code 2 (parse_flags); a signal with
    one line and 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
    STOP.armed, STOP.signum, STOP.stopping = False, 0, False
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        main(parse_flags(args_type))
    except (InputError, FloatingPointError) as e:
        code, message = 1, f"error: {e}"
    except OSError as e:
        code, message = 1, f"error: {os_error_message(e)}"
    except Interrupted as e:
        code, message = 128 + e.signum, str(e)
    except Exception as e:  # JAX's allocation failure (jax.errors.JaxRuntimeError): one line, not a traceback
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        code, message = 1, (f"error: out of memory ({str(e).splitlines()[0][:200]}): lower the sizes behind it (--expand-size, "
                            f"--batch-size, --model-batch-size, --num-seeds, --eval-episodes ...) or free memory; "
                            f"a training run resumes from its last checkpoint")
    finally:  # a script's own process, exiting now: a signal from here on ends it quietly (no atexit
        # traceback); called in-process (tests, a library user), the caller's handlers come back
        for s, handler in previous.items():
            signal.signal(s, _while_exiting if getattr(main, "__module__", "") == "__main__" else handler)
    if code:  # here, the exception and its frames are gone: progress bars have printed their last line
        print(message, file=sys.stderr, flush=True)
        sys.exit(code)
