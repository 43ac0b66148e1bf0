"""The server (serving/): per-request routing, the embedded engine's batching, the OpenAI HTTP API."""

import json
import math

import pytest
import torch

import adaptermix as am
from adaptermix.serving.engine import AUTO, BadRequestError, EngineRequest, UnknownModelError
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
