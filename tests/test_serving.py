"""The server (serving/): per-request routing, the embedded engine's batching, the OpenAI HTTP API."""

import json
import math

import pytest
import torch

import adaptermix as am
from adaptermix.serving.engine import AUTO, BadRequestError, EngineRequest, SamplingParams, UnknownModelError
from adaptermix.serving.routing import RequestRouter

SPECS = {
    "reverse": ("Reverse the order of the words in a sentence", ["reverse: the cat sat"]),
    "celsius": ("Convert temperatures from Celsius to Fahrenheit", ["convert 20 C to F"]),
    "sql": ("Write an SQL query that answers a question about a table", ["count the users in the table"]),
}
BASE = "tiny-llama"


@pytest.fixture(scope="module")
def served(tmp_path_factory, h):
    """A tiny Llama and a library of three real PEFT adapters on it."""
    root = tmp_path_factory.mktemp("serving")
    library = am.AdapterLibrary.create(root / "lib", base_model=h.tiny_llama())
    for i, (name, (description, examples)) in enumerate(SPECS.items()):
        path = h.make_peft_checkpoint(h.tiny_llama, root / "ckpt" / name, seed=10 + i, r=2 + i,
                                      targets=("q_proj", "v_proj", "up_proj"))
        (path / "adaptermix.json").write_text(json.dumps({"description": description, "examples": examples}))
        library.add(path, name=name)
    yield library
    library.close()


def request(model=AUTO, text="", adapters=None, **kw):
    return EngineRequest(request_id="r", prompt=text, route_text=text, model=model, adapters=adapters, **kw)


# -- per-request routing ---------------------------------------------------------------------------------

def test_routing_modes(served):
    router = RequestRouter(am.RetrievalRouter(), served, base_model_name=BASE, label="retrieval")
    assert router.models() == [BASE, AUTO, "reverse", "celsius", "sql"]
    named = router.decide(request("celsius"))
    assert (named.adapters, named.weights, named.router) == (("celsius",), (1.0,), "named")
    base = router.decide(request(BASE))
    assert (base.adapters, base.weights) == ((), ())
    for text, expected in [("convert 30 C to F please", "celsius"), ("count the orders in the table", "sql"),
                           ("reverse: dogs bark loudly", "reverse")]:
        decision = router.decide(request(AUTO, text))
        assert decision.adapters == (expected,) and decision.router == "retrieval", (text, decision)
        assert decision.weights[0] == pytest.approx(1.0)
    mixture = router.decide(request(AUTO, "anything", adapters={"sql": 0.25, "reverse": 0.75, "celsius": 0}))
    assert (mixture.adapters, mixture.weights, mixture.router) == (("sql", "reverse"), (0.25, 0.75), "explicit")


def test_routing_top_k_and_fallback(served):
    top2 = RequestRouter(am.RetrievalRouter(top_k=2, temperature=1.0), served, base_model_name=BASE)
    decision = top2.decide(request(AUTO, "convert 30 C to F please"))
    assert len(decision.adapters) == 2 and decision.adapters[0] == "celsius"
    assert sum(decision.weights) == pytest.approx(1.0) and decision.weights[0] > decision.weights[1]
    strict = RequestRouter(am.RetrievalRouter(min_similarity=0.99), served, base_model_name=BASE)
    fallback = strict.decide(request(AUTO, "the weather in Lisbon"))
    assert fallback.adapters == () and "min_similarity" in fallback.note
    arrow = RequestRouter(am.ArrowRouter(top_k=2), served, base_model_name=BASE, label="arrow")
    placeholder = arrow.decide(request(AUTO, "x"))
    assert placeholder.per_token and placeholder.router == "arrow"
    assert arrow.decide(request("sql")).per_token is False
    with pytest.raises(ValueError, match="cannot route requests"):
        RequestRouter(am.SequenceArrowRouter(), served, base_model_name=BASE)


@pytest.mark.parametrize("adapters, error, param", [
    ({"nope": 1.0}, UnknownModelError, "adapters"),
    ({}, BadRequestError, "adapters"),
    ({"sql": math.nan}, BadRequestError, "adapters.sql"),
    ({"sql": math.inf}, BadRequestError, "adapters.sql"),
    ({"sql": -0.5, "reverse": 1.0}, BadRequestError, "adapters.sql"),
    ({"sql": "heavy"}, BadRequestError, "adapters.sql"),
    ({"sql": True}, BadRequestError, "adapters.sql"),
    ({"sql": 0.0, "reverse": 0}, BadRequestError, "adapters"),
])
def test_routing_bad_mixtures(served, adapters, error, param):
    router = RequestRouter(am.RetrievalRouter(), served, base_model_name=BASE)
    with pytest.raises(error) as caught:
        router.decide(request(AUTO, "x", adapters=adapters))
    assert caught.value.param == param
    if error is UnknownModelError:
        assert caught.value.status == 404 and "['reverse', 'celsius', 'sql']" in caught.value.message


def test_routing_unknown_model(served):
    router = RequestRouter(am.RetrievalRouter(), served, base_model_name=BASE)
    with pytest.raises(UnknownModelError, match=r"'gpt-4'.*'auto', 'reverse'") as caught:
        router.decide(request("gpt-4", "x"))
    assert caught.value.param == "model"


# -- the embedded engine ---------------------------------------------------------------------------------

class AsciiTokenizer:
    """One token per ASCII character (ids 3..127; 2 = end of sequence), like an HF tokenizer to the engine."""

    eos_token_id, pad_token_id, chat_template = 2, 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(max(ord(c), 3), 127) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i >= 3)


def make_engine(library, h, router=None, **kw):
    from adaptermix.serving.embedded import EmbeddedEngine

    model = h.tiny_llama()
    model.generation_config.eos_token_id = 2
    return EmbeddedEngine(model, AsciiTokenizer(), library, router or am.RetrievalRouter(),
                          router_label="retrieval", base_model_name=BASE, **kw)


def reference_greedy(library, h, decision, prompt: str, max_tokens: int) -> str:
    """The unbatched composed model (HF generate, batch 1) with the decision as a fixed mixture."""
    model = h.tiny_llama()
    if decision.adapters:
        model = am.compose(model, library, am.FixedRouter(dict(zip(decision.adapters, decision.weights))),
                           adapters=list(decision.adapters))
    ids = torch.tensor([AsciiTokenizer()(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=2, pad_token_id=0)
    return AsciiTokenizer().decode(out[0, ids.shape[1]:].tolist())


async def collect(engine, req):
    chunks = [chunk async for chunk in engine.generate(req)]
    return "".join(c.text for c in chunks), chunks


def test_batched_greedy_equals_unbatched(served, h):
    import asyncio

    cases = [("convert 30 C to F", AUTO, None), ("count the orders in the table", AUTO, None),
             ("reverse: a b c", "reverse", None), ("hello there", BASE, None),
             ("mix these two", AUTO, {"sql": 0.3, "celsius": 0.7}), ("a much longer prompt " * 2, "sql", None)]
    engine = make_engine(served, h, max_batch_size=4, max_wait_ms=50)

    async def run():
        await engine.start()
        try:
            return await asyncio.gather(*[
                collect(engine, EngineRequest(f"r{i}", p, p, m, a, SamplingParams(
                    max_tokens=6 + i, temperature=0.0))) for i, (p, m, a) in enumerate(cases)])
        finally:
            await engine.stop()

    results = asyncio.run(run())
    assert engine.counters["forward_passes"] < sum(6 + i for i in range(len(cases)))   # rows shared passes
    assert sum(len(text) for text, _ in results) > 20        # the model did speak
    for i, ((prompt, _, _), (text, chunks)) in enumerate(zip(cases, results)):
        decision = chunks[0].routing
        assert decision is not None and all(c.routing is None for c in chunks[1:])
        assert chunks[-1].finish_reason in ("stop", "length")
        assert text == reference_greedy(served, h, decision, prompt, 6 + i), (i, decision)
