"""engine=vllm against a real vLLM server (the `.venv-vllm` that `make vllm` builds) on SmolLM2-135M-Instruct with
the example library, never mocked. One vLLM start (~100 s on 2 cores) serves the whole module.

The reference is adaptermix's embedded engine (the composed model, float32) with the same zero-shot router:
routing must be equal, and greedy answers agree up to bf16 (vLLM) vs fp32 (embedded) rounding, which may
flip a near-tied token.
"""

import asyncio
import json
import os
import signal
import socket
import threading
import time
import urllib.request

import pytest

from adaptermix.library.adapter import LoraAdapter
from adaptermix.models import load_smollm2
from adaptermix.routers import RetrievalRouter
from adaptermix.serving.embedded import EmbeddedEngine
from adaptermix.serving.engine import (AUTO, BadRequestError, EngineRequest, EngineUnavailableError, SamplingParams,
                                       UnknownModelError)
from adaptermix.serving.vllm_engine import VLLMEngine, lora_key
from adaptermix.serving.vllm_server import VLLMServerConfig
from adaptermix.suite import suite_library
from adaptermix.tasks import SUITE, TASKS, chat_prompt

MAX_TOKENS = 20
LABEL = "retrieval_lexical"
MIXTURES = [("date_dmy", {"date_dmy": 0.5, "date_mdy": 0.5}), ("uppercase", {"uppercase": 0.7, "snake_case": 0.3}),
            ("add", {"add": 0.8, "max_number": 0.2}), ("acronym", {"acronym": 1.0, "last_word": 0.25, "repeat_2": 0.1})]
CACHE_SIZE = 6


def router():
    return RetrievalRouter(top_k=1, temperature=0.05, lexical_weight=1.0)   # conf/router/retrieval_lexical.yaml


def instruction(task: str, i: int = 0) -> str:
    return TASKS[task].examples("test", i + 1)[i][0]


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def library():
    with suite_library() as library:
        yield library


@pytest.fixture(scope="module")
def vllm(loop, library, tmp_path_factory):
    config = VLLMServerConfig(max_lora_rank=16, max_loras=4, max_cpu_loras=8, threads=2, startup_timeout_s=600)
    engine = VLLMEngine(library, router(), router_label=LABEL, server=config, cache_size=CACHE_SIZE,
                        work_dir=tmp_path_factory.mktemp("vllm"))
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.stop())


@pytest.fixture(scope="module")
def embedded(loop, library):
    model, tokenizer = load_smollm2()
    engine = EmbeddedEngine(model, tokenizer, library, router(), router_label=LABEL, max_batch_size=16)
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.stop())


def request(engine, text: str, model: str = AUTO, adapters=None, max_tokens: int = MAX_TOKENS, rid: str = "r"):
    return EngineRequest(rid, chat_prompt(engine.tokenizer, text), text, model, adapters,
                         SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def collect(engine, req):
    chunks = [chunk async for chunk in engine.generate(req)]
    return "".join(c.text for c in chunks), chunks


def run_all(loop, engine, requests):
    async def together():
        return await asyncio.gather(*[collect(engine, r) for r in requests])

    return loop.run_until_complete(together())


def vllm_lora_names(engine) -> set[str]:
    """The LoRAs vLLM itself lists (its /v1/models), not our bookkeeping."""
    with urllib.request.urlopen(f"{engine.server.url}/v1/models", timeout=10) as response:
        cards = json.load(response)["data"]
    return {card["id"] for card in cards if card["id"] != engine.base_model_name}


def compare(loop, vllm, embedded, cases, what: str) -> float:
    """Run (text, model, adapters) cases on both engines; routing must be equal; the share of equal answers."""
    ours = run_all(loop, vllm, [request(vllm, t, m, a, rid=f"v{i}") for i, (t, m, a) in enumerate(cases)])
    theirs = run_all(loop, embedded, [request(embedded, t, m, a, rid=f"e{i}") for i, (t, m, a) in enumerate(cases)])
    agree = 0
    for (text, _, _), (answer, chunks), (reference, reference_chunks) in zip(cases, ours, theirs):
        decision, expected = chunks[0].routing, reference_chunks[0].routing
        assert decision is not None and all(c.routing is None for c in chunks[1:])
        assert decision.adapters == expected.adapters and decision.router == expected.router, text
        assert decision.weights == pytest.approx(expected.weights, abs=1e-6), text
        assert chunks[-1].finish_reason in ("stop", "length") and 0 < chunks[-1].completion_tokens <= MAX_TOKENS
        assert chunks[-1].prompt_tokens == vllm.count_tokens(request(vllm, text).prompt)
        agree += answer == reference
        if answer != reference:
            print(f"  {what}: {text!r}\n    vllm     {answer!r}\n    embedded {reference!r}")
    print(f"{what}: {agree}/{len(cases)} greedy answers equal (vLLM bf16 vs embedded fp32)")
    return agree / len(cases)


def test_auto_routing_and_answers_agree_with_embedded(loop, vllm, embedded):
    cases = [(instruction(task, i), AUTO, None) for task in SUITE for i in range(2)]
    assert compare(loop, vllm, embedded, cases, "model=auto") >= 0.75
    assert vllm.cache.loads >= len(SUITE) - 2          # the router spread the prompts over the library


def test_explicit_adapters_agree_with_embedded(loop, vllm, embedded):
    cases = [(instruction(task, 2), AUTO, mixture) for task, mixture in MIXTURES]
    cases += [(instruction(task, 2), task, None) for task, _ in MIXTURES]      # a named adapter alone
    assert compare(loop, vllm, embedded, cases, "explicit adapters") >= 0.75


def test_mixture_lora_is_the_exact_weighted_sum(loop, vllm, library):
    """The rank-concatenated LoRA that vLLM was given: B·A = Σ w_i·s_i·B_i·A_i at every module."""
    task, mixture = MIXTURES[3]
    answer, chunks = run_all(loop, vllm, [request(vllm, instruction(task, 3), adapters=mixture, max_tokens=2)])[0]
    name = vllm.lora_name(lora_key(chunks[0].routing, vllm.weight_decimals))
    assert name in vllm_lora_names(vllm)
    fused = LoraAdapter.from_peft(vllm.work_dir / "mixtures" / name)
    assert set(fused.modules) == set(library.get(task).modules)
    for module, m in fused.modules.items():
        expected = sum(w * library.get(n).modules[module].delta_weight() for n, w in mixture.items())
        assert m.rank == 4 * len(mixture)
        assert (m.delta_weight() - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_lru_evicts_and_unloads_from_vllm(loop, vllm):
    """After a sequential request (every LoRA idle again), the cache is within capacity, and vLLM lists exactly
    the LoRAs the cache holds: the evicted ones were unloaded from vLLM too."""
    text, _ = run_all(loop, vllm, [request(vllm, instruction("repeat_3", 3), adapters={"repeat_3": 0.9})])[0]
    assert text
    assert vllm.cache.evictions > 0 and len(vllm.cache) <= CACHE_SIZE
    assert vllm_lora_names(vllm) == set(vllm.cache.names())


def test_bad_requests_get_clear_errors_and_later_ones_work(loop, vllm):
    text = instruction("add", 4)
    cases = [(request(vllm, text, max_tokens=vllm.max_context), BadRequestError, "max_tokens"),
             (request(vllm, "word " * 600), BadRequestError, "prompt"),
             (request(vllm, text, model="no_such_adapter"), UnknownModelError, "model"),
             (request(vllm, text, adapters={n: 1.0 for n in SUITE[:5]}), BadRequestError, "adapters"),  # rank 20 > 16
             (request(vllm, text, adapters={"add": float("nan")}), BadRequestError, "adapters.add")]
    for req, error, param in cases:
        with pytest.raises(error) as caught:
            run_all(loop, vllm, [req])
        assert caught.value.param == param, caught.value.message
    answer, chunks = run_all(loop, vllm, [request(vllm, text)])[0]
    assert answer and chunks[-1].finish_reason in ("stop", "length")


def test_serve_refuses_per_token_routers_and_a_missing_vllm_venv(loop, library, capsys):
    """Clear errors without a vLLM: per-token routers stay on the embedded engine; no interpreter is a 503 reason."""
    from adaptermix.cli import main as adaptermix

    assert adaptermix(["serve", str(library.root), "engine=vllm", "router=arrow"]) == 1
    assert "routes every token" in capsys.readouterr().err
    engine = VLLMEngine(library, router(), server=VLLMServerConfig(python="/nonexistent/python"))
    with pytest.raises(EngineUnavailableError, match="no vLLM interpreter at /nonexistent/python"):
        loop.run_until_complete(engine.start())
    assert engine.health()["status"] == "unavailable"
    loop.run_until_complete(engine.stop())
    assert not engine.work_dir.exists()       # its temporary exports are gone


def test_attach_to_a_dead_url_is_unavailable(loop, library):
    engine = VLLMEngine(library, router(), server=VLLMServerConfig(url="http://127.0.0.1:9", startup_timeout_s=3))
    with pytest.raises(EngineUnavailableError, match="did not answer /health"):
        loop.run_until_complete(engine.start())
    assert engine.health()["status"] == "unavailable"
    with pytest.raises(EngineUnavailableError, match="did not answer /health"):
        run_all(loop, engine, [request(engine, "hello")])
    loop.run_until_complete(engine.stop())


def test_serve_app_with_engine_vllm_over_http(loop, vllm, library):
    """`adaptermix serve`'s app from conf/serve.yaml with engine=vllm, attached to this module's vLLM by URL,
    under real uvicorn: the official openai client and plain HTTP get the direct engine's answers and the routing."""
    import httpx
    import openai
    import uvicorn

    from adaptermix.serving.cli import build_app, load_serve_config

    cfg, label = load_serve_config(["engine=vllm", f"vllm.url={vllm.server.url}", "vllm.max_lora_rank=16"])
    app = build_app(str(library.root), cfg, label)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        text = instruction("date_mdy", 6)
        prompt = chat_prompt(vllm.tokenizer, text)
        direct = {m: run_all(loop, vllm, [request(vllm, text, m, a)])[0][0] for m, a in
                  [("date_mdy", None), (AUTO, {"date_mdy": 0.6, "date_dmy": 0.4})]}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model="date_mdy", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert answer.choices[0].text == direct["date_mdy"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            assert http.get("/health").json()["status"] == "ok"
            body = {"model": AUTO, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "adapters": {"date_mdy": 0.6, "date_dmy": 0.4}}
            reply = http.post("/v1/completions", json=body).json()
            assert reply["choices"][0]["text"] == direct[AUTO]
            assert reply["adaptermix"]["adapters"] == ["date_mdy", "date_dmy"] and reply["adaptermix"]["router"] == "explicit"
            routed = http.post("/v1/completions", json={**body, "adapters": None}).json()
            assert routed["adaptermix"]["router"] == label
            missing = http.post("/v1/completions", json={**body, "model": "no_such_adapter"})
            assert missing.status_code == 404 and "no_such_adapter" in missing.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def test_vllm_killed_mid_stream_gives_503_and_later_requests_clear_errors(loop, vllm):
    """Runs last: it kills the module's vLLM."""
    long = request(vllm, "Tell me a long story about a lighthouse.", model=vllm.base_model_name, max_tokens=400)

    async def kill_after_first_chunk():
        stream = vllm.generate(long)
        first = await stream.__anext__()
        assert first.routing is not None and first.routing.adapters == ()
        os.killpg(vllm.server.process.pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailableError) as caught:
            async for _ in stream:
                pass
        return caught.value

    error = loop.run_until_complete(kill_after_first_chunk())
    assert error.status == 503
    for req in (request(vllm, instruction("add", 5)), request(vllm, "x", adapters={"add": 0.5, "date_dmy": 0.5})):
        with pytest.raises(EngineUnavailableError, match="exited with code -9") as caught:
            run_all(loop, vllm, [req])
        assert caught.value.status == 503
    assert vllm.health()["status"] == "unavailable" and "exited" in vllm.health()["reason"]


def test_mixture_exports_never_touch_a_users_folder(tmp_path):
    """A user-supplied work_dir may already hold a `mixtures` folder: it is refused, not written into, and an
    unload deletes only inside the mixtures folder adaptermix made and marked."""
    from adaptermix.library.errors import FolderNotOwnedError
    from adaptermix.serving.vllm_engine import mixtures_folder, remove_mixture

    user = tmp_path / "user"
    (user / "mixtures" / "mix-1").mkdir(parents=True)
    (user / "mixtures" / "mix-1" / "notes.txt").write_text("mine")
    with pytest.raises(FolderNotOwnedError, match="mixtures"):
        mixtures_folder(user)
    remove_mixture(user, "mix-1")
    assert (user / "mixtures" / "mix-1" / "notes.txt").read_text() == "mine"

    ours = mixtures_folder(tmp_path / "ours")
    assert mixtures_folder(tmp_path / "ours") == ours          # made once, then reused
    (ours / "mix-2").mkdir()
    (ours / "mix-3").symlink_to(user / "mixtures" / "mix-1")
    remove_mixture(tmp_path / "ours", "mix-2")
    remove_mixture(tmp_path / "ours", "mix-3")
    assert not (ours / "mix-2").exists()
    assert (user / "mixtures" / "mix-1" / "notes.txt").read_text() == "mine"
