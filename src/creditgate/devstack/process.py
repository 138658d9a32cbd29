"""Server processes that run in the background and are found again by pid file."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from creditgate.devstack.errors import DevStackError

_POLL_SECONDS = 0.05
_KILL_WAIT_SECONDS = 10.0
_EXEC_WAIT_SECONDS = 5.0
_TAIL_LINES = 30
_PROC = Path("/proc")


# The ports the OS picks itself (a bind to port 0, and the local port of every outgoing
# connection) come from its ephemeral range, so a port picked there and free a moment ago
# can be taken by some client's connection before the server binds it: a broker of the
# fault tests failed so ("Address already in use"). The stacks' ports are picked below
# that range instead, at random, and none twice in one process.
_LOWEST_PORT = 10_000
_EPHEMERAL_RANGE = _PROC / "sys/net/ipv4/ip_local_port_range"
_handed_out: set[int] = set()


def ephemeral_port_start() -> int:
    """The first port of the OS's ephemeral range (Linux's default when unreadable)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def find_free_port() -> int:
    """A loopback TCP port that was free a moment ago, below the OS's ephemeral range
    (see above), never one this process was given before."""
    highest = max(ephemeral_port_start() - 1, _LOWEST_PORT + 1000)
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randint(_LOWEST_PORT, highest)
        if port not in _handed_out and port_is_free(port):
            _handed_out.add(port)
            return port
    raise DevStackError(f"no free TCP port between {_LOWEST_PORT} and {highest} on 127.0.0.1")


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR, so a port held only by TIME_WAIT
        # connections of a stopped server counts as free for them too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_ports_free(ports: Sequence[int], timeout: float) -> bool:
    """Wait until all `ports` are free; False if one is still taken after `timeout` seconds.

    A server killed a moment ago can hold its listening sockets for a little
    while after its pid is gone.
    """
    deadline = time.monotonic() + timeout
    while not all(port_is_free(port) for port in ports):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def require_executable(name: str, install_hint: str) -> str:
    """The full path of `name` on PATH, or an error that says how to install it."""
    found = shutil.which(name)
    if found is None:
        raise DevStackError(f"{name} not found: {install_hint}")
    return found


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (created 0600, never chmod-ed later).

    The file is replaced, not rewritten in place: a reader never sees half of it.
    """
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(partial, path)


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last `lines` lines of a log file, or "" when there is none."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
    """One background server: started detached, tracked by a pid file.

    `marker` is how its command line ends (a path of this stack); it tells
    our server apart from an unrelated process that got the same pid after a
    reboot, and from the same server of another stack.
    """

    def __init__(
        self,
        name: str,
        *,
        pid_file: Path,
        output_log: Path,
        marker: str,
        other_logs: Sequence[Path] = (),
    ) -> None:
        self.name = name
        self.pid_file = pid_file
        self.output_log = output_log
        self._marker = marker
        self._logs = (output_log, *other_logs)

    @property
    def pid(self) -> int | None:
        """The pid of the running server, None when it is not running."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_running(pid, self._marker) else None

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Start the server in the background and record its pid."""
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            pid = _spawn(argv, self.output_log, os.environ if env is None else env)
        except OSError as exc:
            raise DevStackError(f"could not start {self.name} ({argv[0]}): {exc}") from exc
        self.pid_file.write_text(f"{pid}\n")
        # posix_spawn returns while the kernel is still inside exec, when the
        # command line reads empty: wait until it shows, so that `pid` (and so
        # `stop` and `kill`) finds the server from the moment `start` returns.
        deadline = time.monotonic() + _EXEC_WAIT_SECONDS
        while not _is_running(pid, self._marker) and _exists(pid):
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_SECONDS / 10)
        return pid

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until it holds; fail early if the server exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.pid is None:
                raise DevStackError(f"{self.name} exited while starting.{self._log_tails()}")
            if time.monotonic() >= deadline:
                raise DevStackError(
                    f"{self.name} did not answer within {timeout:g}s.{self._log_tails()}"
                )
            time.sleep(_POLL_SECONDS * 2)

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
        pid = self.pid
        if pid is not None:
            _signal_group(pid, signal.SIGTERM)
            if not self._wait_gone(pid, timeout):
                _signal_group(pid, signal.SIGKILL)
                self._wait_gone_or_fail(pid)
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL at once: a crash, without any shutdown work."""
        pid = self.pid
        if pid is not None:
            _signal_group(pid, signal.SIGKILL)
            self._wait_gone_or_fail(pid)
        self.pid_file.unlink(missing_ok=True)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        # Identity was checked before the signal; from here only existence counts.
        while _exists(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)
        return True

    def _wait_gone_or_fail(self, pid: int) -> None:
        if not self._wait_gone(pid, _KILL_WAIT_SECONDS):
            raise DevStackError(f"{self.name} (pid {pid}) is still running after SIGKILL")

    def _log_tails(self) -> str:
        parts = [
            f"\n--- last lines of {log} ---\n{text}" for log in self._logs if (text := tail(log))
        ]
        return "".join(parts) or f" Its log {self.output_log} is empty."


def _spawn(argv: Sequence[str], output_log: Path, env: Mapping[str, str]) -> int:
    # posix_spawn rather than subprocess.Popen: the server has to outlive this
    # process (the CLI exits right after `dev up`), and a Popen object dropped
    # while its child still runs warns and keeps the child on a reap list.
    # setsid puts the server in its own session and process group, so a Ctrl-C
    # in the terminal that ran `dev up` does not reach it, and killpg stops it
    # together with any helper it forked (Redis forks to rewrite its AOF).
    # Python ignores SIGPIPE and an ignored signal stays ignored across exec,
    # so the server gets the default dispositions back.
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return os.posix_spawn(
        argv[0],
        list(argv),
        dict(env),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(output_log), append, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
        setsigmask=(),
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGINT, signal.SIGTERM),
    )


def _is_running(pid: int, marker: str) -> bool:
    """Whether `pid` is alive and its command line ends with " " + `marker`."""
    if not _exists(pid):
        return False
    try:
        cmdline = (_PROC / str(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        # No /proc at all (not Linux): trust the pid file; else it just exited.
        return not _PROC.is_dir()
    text = cmdline.replace(b"\0", b" ").decode(errors="replace").rstrip()
    return text.endswith(" " + marker)


def _exists(pid: int) -> bool:
    """Whether `pid` is a process that has not finished exiting.

    A process counts as gone only once it is a zombie: by then the kernel has
    closed its sockets, so its ports can be bound again. (While it is still
    exiting its command line already reads empty.)
    """
    # A child of ours that exited stays a zombie until it is waited for, and a
    # zombie still answers kill(pid, 0): reap it first.
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process, so not a server we started
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return not _PROC.is_dir()
    # "pid (command name) state ...": the name may hold spaces and parentheses.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The server leads its own process group (see _spawn).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
