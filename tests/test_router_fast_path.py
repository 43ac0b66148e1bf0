"""The sequence routers' batched probe scoring (one matmul per input width, routers/sequence_arrow.py) against
the per-module reference it replaced: the same scores and the same decisions, with and without calibration,
candidates, adapters missing a module, ranks that differ, two prompts with padding, both score kinds."""

from types import SimpleNamespace

import pytest
import torch

import adaptermix as am
from adaptermix.library import default_encoder
from adaptermix.routers.routing import RoutingContext

WIDTHS = {f"layers.{i}.{kind}": width for i in range(3) for kind, width in
          (("q_proj", 24), ("v_proj", 24), ("down_proj", 40))}
DESCRIPTIONS = ["Convert text to upper case letters", "Rewrite an ISO date as day/month/year",
                "Add two whole numbers", "Repeat a word twice", "Extract the email address from a sentence",
                "Sort a list of numbers", "Give the last word of a list", "Write the acronym of the words"]


class SmallLibrary:
    """What a router's bind() reads from a library: random LoRA SVD factors on modules of two input widths;
    adapter 3 has rank 2, adapter 5 lacks the down_proj of layer 1."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.names = [f"adapter_{i}" for i in range(len(DESCRIPTIONS))]
        self.factors = {}
        for e, name in enumerate(self.names):
            rank = 2 if e == 3 else 4
            self.factors[name] = {m: (torch.linalg.qr(torch.randn(d, rank, generator=generator)).Q.T,
                                      torch.rand(rank, generator=generator).sort(descending=True).values + 0.1)
                                  for m, d in WIDTHS.items() if not (e == 5 and m == "layers.1.down_proj")}
        self.encoder = default_encoder()
        self.vectors = self.encoder.encode(DESCRIPTIONS)

    def prototypes(self, name, modules=None):
        return {m: f for m, f in self.factors[name].items() if modules is None or m in modules}

    def record(self, name):
        return SimpleNamespace(name=name, description=DESCRIPTIONS[self.names.index(name)], examples=())

    def text_embeddings(self, names):
        return list(names), self.vectors[[self.names.index(n) for n in names]]


def context(prompts, lengths, seq_len):
    mask = torch.tensor([[0] * (seq_len - n) + [1] * n for n in lengths])           # left padding
    return RoutingContext(batch_size=len(prompts), seq_len=seq_len, past_len=0, attention_mask=mask,
                          sequence_ids=torch.arange(len(prompts)).repeat_interleave(seq_len),
                          input_ids=torch.zeros(len(prompts), seq_len, dtype=torch.long), prompts=prompts)


def reference_scores(router, hidden, make_context):
    """The per-module probe scoring the batched path replaced: each module's sequence scores, z-scored across
    adapters over the finite ones, summed in module order, averaged."""
    ctx = make_context()
    total = 0
    for module, x in hidden.items():
        per_sequence = router._sequence_scores(module, x, ctx)
        finite = torch.isfinite(per_sequence)
        centred = per_sequence - per_sequence.where(finite, 0).sum(1, keepdim=True) / finite.sum(1, keepdim=True)
        spread = centred.where(finite, 0).pow(2).sum(1, keepdim=True).div(finite.sum(1, keepdim=True)).sqrt()
        total = total + torch.where(finite, centred / spread.clamp_min(1e-6), 0.0)
    return total / len(hidden)


def fast_scores(router, hidden, make_context):
    ctx = make_context()
    router.begin_probe(ctx.state, "route")
    for module, x in hidden.items():
        router.observe(module, x, ctx)
    router.end_probe(ctx)
    return router.last_signals["weights"], ctx.state[("sequence_arrow", "routing")]


@pytest.mark.parametrize("options", [
    dict(score="subspace", calibrate=True),
    dict(score="prototype", calibrate=True),
    dict(score="subspace", calibrate=False),
    dict(score="subspace", calibrate=True, candidates=3),
    dict(score="subspace", calibrate=True, candidates=100),                # more candidates than adapters
])
def test_batched_probe_scores_equal_the_per_module_reference(options):
    library = SmallLibrary()
    n = len(library.names)
    available = {m: torch.tensor([not (e == 5 and m == "layers.1.down_proj") for e in range(n)]) for m in WIDTHS}
    router = am.HybridRouter(**options)
    router.bind(library, library.names, available)
    generator = torch.Generator().manual_seed(1)
    if options["calibrate"]:
        router.stats = {m: (torch.randn(d, generator=generator), torch.rand(n, generator=generator),
                            torch.rand(n, generator=generator) + 0.5) for m, d in WIDTHS.items()}
    prompts, lengths, seq_len = ["Rewrite the date 2021-03-09 as day/month/year.", "Say moon twice"], [7, 4], 7
    hidden = {m: torch.randn(len(prompts) * seq_len, d, generator=generator) for m, d in WIDTHS.items()}
    expected = reference_scores(router, hidden, lambda: context(prompts, lengths, seq_len))
    weights, routing = fast_scores(router, hidden, lambda: context(prompts, lengths, seq_len))
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isfinite(weights), torch.isfinite(expected))
    assert routing.indices.tolist() == router._choose(expected, context(prompts, lengths, seq_len)).indices.tolist()
    # a second call reuses the stacked calibration statistics and gives the same answer
    again, _ = fast_scores(router, hidden, lambda: context(prompts, lengths, seq_len))
    assert torch.equal(again, weights)
    if options.get("candidates") == 3:
        assert ((weights != 0).sum(1) <= 3).all()                          # only the candidates are scored
