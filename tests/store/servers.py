"""Real servers for the remote-tier tests and benchmarks, on 127.0.0.1: an S3 server (moto) and a Mooncake master
with one storage node. Each is a context manager that starts its processes on free ports, waits until they accept
connections, and stops exactly the processes it started (also :meth:`kill`, :meth:`pause` and :meth:`resume` for
outage tests). :class:`SlowProxy` sits in front of a server to make it slow."""
import importlib.util
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

S3_BUCKET = "ucm-test"
S3_KEYS = {"s3_access_key_id": "AKIAUCMTEST", "s3_secret_access_key": "ucm-test-secret-do-not-log"}
START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; RuntimeError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args[0]} exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server {proc.args[0]} not listening on port {port} after {timeout} s")


def wait_stopped(pid: int, timeout: float = START_TIMEOUT) -> None:
    """Return once every thread of process ``pid`` is in the stopped state ('T' in /proc/PID/task/TID/stat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that just exited
        if states and all(state in "Tt" for state in states):
            return
        time.sleep(0.005)
    raise RuntimeError(f"process {pid} not stopped {timeout} s after SIGSTOP")


class _Servers:
    """Processes started in order (each waited for on its port) and stopped in reverse order."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self._logs = tempfile.TemporaryDirectory(prefix="ucm-servers-")

    def launch(self, argv: list[str], port: int) -> None:
        log = open(Path(self._logs.name) / f"{len(self.procs)}.log", "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        wait_for_port(port, proc)

    def argv(self) -> list[tuple[list[str], int]]:
        """(command, port to wait for) of each process, in start order."""
        raise NotImplementedError

    def start(self) -> None:
        for argv, port in self.argv():
            self.launch(argv, port)

    def kill(self) -> None:
        """SIGKILL every process this object started (a crash, not a shutdown)."""
        for proc in reversed(self.procs):
            proc.kill()
            proc.wait()
        self.procs = []

    def pause(self) -> None:
        """SIGSTOP every process: a hung server (connections accepted by the kernel, never answered). Returns once
        every thread has stopped: the signal takes effect asynchronously, and a server thread still running just
        after ``kill()`` returned could answer one more request."""
        for proc in self.procs:
            proc.send_signal(signal.SIGSTOP)
        for proc in self.procs:
            wait_stopped(proc.pid)

    def resume(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGCONT)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self._logs.cleanup()


class MotoS3Server(_Servers):
    """moto's S3 server with bucket :data:`S3_BUCKET`; :meth:`config` gives the DS3FS keys that reach it."""

    def __init__(self):
        super().__init__()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def argv(self):
        return [([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], self.port)]

    def start(self) -> None:
        super().start()
        self.client().create_bucket(Bucket=S3_BUCKET)

    def client(self):
        """A boto3 S3 client for inspecting and damaging objects behind the tier's back."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_KEYS["s3_access_key_id"],
                            aws_secret_access_key=S3_KEYS["s3_secret_access_key"])

    def config(self, **extra) -> dict:
        return {"store_pipeline": "Cache|DS3FS", "s3_bucket": S3_BUCKET, "s3_endpoint": self.endpoint,
                "s3_region": "us-east-1", **S3_KEYS, **extra}

    def environment(self) -> dict:
        """The standard AWS variables that reach this server (for a node configured by its environment)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_BUCKET_NAME": S3_BUCKET, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": S3_KEYS["s3_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": S3_KEYS["s3_secret_access_key"]}


class MooncakeServers(_Servers):
    """A Mooncake master and one storage node lending ``segment_bytes`` to the pool (P2P handshake: no metadata
    service); :meth:`config` gives the Mooncake keys of a pure client (no memory of its own)."""

    def __init__(self, segment_bytes: int = 256 << 20):
        super().__init__()
        self.port, self.metrics_port, self.node_port = free_port(), free_port(), free_port()
        self.master = f"127.0.0.1:{self.port}"
        self.segment_bytes = segment_bytes
        self.bin_dir = Path(importlib.util.find_spec("mooncake").submodule_search_locations[0])

    def argv(self):
        master = [str(self.bin_dir / "mooncake_master"), f"--rpc_port={self.port}", "--rpc_address=127.0.0.1",
                  f"--metrics_port={self.metrics_port}"]
        node = [str(self.bin_dir / "mooncake_client"), f"--master_server_address={self.master}",
                "--metadata_server=P2PHANDSHAKE", "--host=127.0.0.1", f"--port={self.node_port}", "--protocol=tcp",
                f"--global_segment_size={self.segment_bytes}", "--local_buffer_size=16777216"]
        return [(master, self.port), (node, self.node_port)]

    def config(self, **extra) -> dict:
        return {"store_pipeline": "Cache|Mooncake", "mooncake_master": self.master,
                "mooncake_local_hostname": "127.0.0.1", "mooncake_local_buffer_size": 64 << 20, **extra}


class SlowProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port`` that holds every chunk of the server's replies for
    ``delay`` seconds (changeable while it runs): a slow server or network. Context manager; closing it drops every
    connection it carries."""

    def __init__(self, upstream_port: int, delay: float = 0.0):
        self.upstream_port = upstream_port
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True, name="slow-proxy").start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            self._sockets += [client, upstream]
            for src, dst, slow in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, slow), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if slow:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            _hang_up(sock)

    def __enter__(self) -> "SlowProxy":
        return self

    def __exit__(self, *exc) -> None:
        for sock in [self._listener, *self._sockets]:
            _hang_up(sock)


def _hang_up(sock: socket.socket) -> None:
    """Shut ``sock`` down (which wakes a thread blocked in its accept or recv; close alone does not), then close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
