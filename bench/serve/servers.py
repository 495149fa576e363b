"""Starting, watching and stopping the two servers as processes of their own, the same way for both."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

READY = re.compile(r"ready on (http://\S+/v1)")


def ours_command(adapters: dict[str, Path], max_batch: int = 64) -> list[str]:
    """`adapterhub serve` with every adapter loaded at start, one slot each (no eviction in the runs)."""
    return [
        sys.executable,
        "-m",
        "adapterhub.cli",
        "serve",
        "--max-adapters",
        str(len(adapters)),
        "--max-rank",
        "16",
        "--max-batch",
        str(max_batch),
        "--port",
        "0",
        *[arg for name, d in adapters.items() for arg in ("--adapter", f"{name}={d}")],
    ]


def peft_command(adapters: dict[str, Path]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.serve.peft_server",
        "--port",
        "0",
        *[arg for name, d in adapters.items() for arg in ("--adapter", f"{name}={d}")],
    ]


class Server:
    """A server process; `url` once it printed its ready line."""

    def __init__(self, name: str, command: list[str]):
        self.name, self.command = name, command
        self.log = Path(tempfile.mkstemp(prefix=f"bench-serve-{name}-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.started_in = 0.0

    def start(self, timeout: float = 600.0) -> Server:
        start = time.perf_counter()
        root = Path(__file__).resolve().parents[2]  # the repository: `bench` importable in the child
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
        while time.perf_counter() - start < timeout:
            found = READY.search(self.log.read_text(errors="replace"))
            if found:
                self.url, self.started_in = found.group(1), time.perf_counter() - start
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"the {self.name} server did not get ready in {timeout:.0f} s (exit code "
            f"{self.process.returncode}); its log {self.log} ends:\n{self.tail()}"
        )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def health(self) -> dict:
        return httpx.get(self.url.removesuffix("/v1") + "/health", timeout=30).json()

    def generated_tokens(self) -> float:
        """adapterhub_generated_tokens_total from /metrics (both servers count every token they generate)."""
        text = httpx.get(self.url.removesuffix("/v1") + "/metrics", timeout=30).text
        return float(re.search(r"^adapterhub_generated_tokens_total (\S+)$", text, re.M).group(1))

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until nothing is queued or running (cancelled requests of the last run have left) and no token
        was generated for a second (/health does not see a prefill in progress)."""
        start, last = time.perf_counter(), None
        while time.perf_counter() - start < timeout:
            h, tokens = self.health(), self.generated_tokens()
            if not h["queue_depth"] and not h["running_rows"] and tokens == last:
                return
            last = tokens
            time.sleep(1.0)
        raise RuntimeError(f"the {self.name} server was still busy {timeout:.0f} s after the run: {self.health()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class OtherLoad:
    """CPU the rest of the machine used while a run went on (in cores): all busy CPU time minus this
    process's and the server's. On a quiet machine it stays near 0; runs with more were disturbed.
    None where /proc is not there."""

    def __init__(self, server: Server):
        self.pid = server.process.pid

    def __enter__(self) -> OtherLoad:
        self.start, self.value = self._sample(), None
        return self

    def __exit__(self, *_) -> None:
        end = self._sample()
        if self.start is not None and end is not None:
            (t0, busy0, ours0), (t1, busy1, ours1) = self.start, end
            self.value = max(((busy1 - busy0) - (ours1 - ours0)) / (t1 - t0), 0.0)

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            tick = os.sysconf("SC_CLK_TCK")
            cpu = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(cpu[:8]) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
            ours = sum(_process_cpu(pid) for pid in (os.getpid(), self.pid)) / tick
        except (OSError, ValueError, IndexError):
            return None
        return time.perf_counter(), busy, ours


def _process_cpu(pid: int) -> float:
    """utime + stime of `pid` in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return float(fields[11]) + float(fields[12])
