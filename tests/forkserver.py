"""Run contexta_ops commands in fresh processes forked from one that has already loaded the module.

Started by tests/helpers.py as ``python forkserver.py CONTEXTA.PYZ``.  Loading the module costs about
80 ms of every ``python contexta.pyz`` run (interpreter start, imports, ~60 dataclasses); the suite
runs a thousand commands.  Here the module is loaded once, from the built archive, and each command
runs in a child forked from this process: its own pid, environment, working directory, stdio files,
locks and exit status, killed for real by the crash hook's SIGKILL.  What a fork skips - the
interpreter's start-up and the archive's launcher - is tested by test_pyz.py, which always runs
``python contexta.pyz``; OPS_TEST_EXEC=1 runs every test's commands that way too.

Protocol, one JSON request per line on stdin:
    {"args": [...], "env": {...}, "cwd": "...", "stdin": path|null, "stdout": path, "stderr": path}
answered on stdout with "started PID" right after the fork and "exited RETURNCODE" when the child
has gone (RETURNCODE as subprocess reports it: negative for a signal).
"""

import json
import os
import sys
import traceback


_replaced = []


def _returncode(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _exit_code(code):
    """What the interpreter makes of sys.exit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write("%s\n" % (code,))
    return 1


def _run_child(module, pyz, request, streams):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # read at import, so set again from this command's environment (the server's has no crash hook)
    module._CRASH_HOOKED = module._crash_hook_wanted()
    for fd, path, flags in ((0, request["stdin"] or os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    encoding, errors = streams
    _replaced.extend((sys.stdin, sys.stdout, sys.stderr))  # collected, they would close fds 0-2: the new ones
    sys.stdin = sys.__stdin__ = open(0, "r", encoding=encoding, errors=errors, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding=encoding, errors=errors, closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding=encoding, errors="backslashreplace",
                                       closefd=False)
    sys.argv = [pyz] + request["args"]
    try:
        code = _exit_code(module.main(request["args"]))
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: B902 - as the interpreter would: the traceback, exit 1
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe at exit changes nothing here
            pass
    os._exit(code)


def serve(pyz):
    sys.path.insert(0, pyz)
    import contexta_ops  # the module at the archive's root, as `import contexta_ops` finds it in scripts

    streams = (sys.stdout.encoding, sys.stdout.errors)
    control_in, control_out = sys.stdin.buffer, sys.stdout.buffer
    for line in control_in:
        request = json.loads(line.decode("utf-8"))
        pid = os.fork()
        if pid == 0:
            try:
                _run_child(contexta_ops, pyz, request, streams)
            except BaseException:  # noqa: B902 - the harness failed, not the command
                traceback.print_exc()
            os._exit(70)
        control_out.write(b"started %d\n" % pid)
        control_out.flush()
        _, status = os.waitpid(pid, 0)
        control_out.write(b"exited %d\n" % _returncode(status))
        control_out.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
