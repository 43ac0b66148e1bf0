"""Routing plots as API: prompts x adapters, one prompt's tokens x adapters, a batch split by prompt; the
rows they draw are the trace's own numbers, labels are never cut, a long batch stays a readable size."""

import matplotlib.image
import pytest
import torch

import adaptermix as am
from adaptermix.composer.plots import MAX_HEIGHT, _wrap

PROMPTS = ["count the users in the table. then write the query", "convert 20 C to F", "the date"]


@pytest.fixture
def traced(library, checkpoints, h):
    """A tiny Llama composed with three adapters that generated 4 tokens for a left-padded batch of 3."""
    library.add_many(checkpoints["sql"].parent, progress=False)
    model = am.compose(h.tiny_llama(), library, am.ArrowRouter(top_k=2))
    torch.manual_seed(0)
    lengths = [7, 3, 5]
    ids = torch.randint(3, 128, (3, 7))
    mask = torch.stack([torch.arange(7) >= 7 - n for n in lengths]).long()
    am.set_prompts(model, PROMPTS)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return am.routing_trace(model), mask, out[:, 7:]


def test_token_rows_follow_the_prompts(traced):
    trace, mask, new = traced
    matrix, owner = trace.token_rows()
    assert torch.equal(torch.bincount(owner), mask.sum(1) + new.shape[1] - 1)   # padding dropped
    assert torch.equal(owner, torch.sort(owner).values)
    first = trace.mixture(trace.modules[0])[:7]   # prompt 0 has no padding: its prefill rows come first
    torch.testing.assert_close(trace.token_rows(trace.modules[0])[0][:7], first)
    assert trace.prompts == PROMPTS and torch.equal(trace.attention_mask, mask)


def test_plot_prompts_draws_the_prompt_shares(traced, tmp_path):
    trace, mask, new = traced
    shares = trace.prompt_shares()
    expected = trace.decision_counts(mask)
    torch.testing.assert_close(shares, expected / expected.sum(1, keepdim=True))
    path = trace.plot_prompts(tmp_path / "prompts.png", labels=["sql question", "temperature", "dates"])

    assert matplotlib.image.imread(path).shape[0] > 100
    with pytest.raises(ValueError, match="2 labels for 3 prompts"):
        trace.plot_prompts(tmp_path / "x.png", labels=["a", "b"])


def test_heatmaps_per_prompt_and_for_the_batch(traced, tmp_path):
    trace, mask, new = traced
    one = trace.heatmap(tmp_path / "one.png", prompt=1, tokens=[f"t{i}" for i in range(3 + 3)])
    batch = trace.heatmap(tmp_path / "batch.png")
    assert one.stat().st_size > 1000 and batch.stat().st_size > 1000
    assert matplotlib.image.imread(batch).shape[0] <= (MAX_HEIGHT + 3) * 120
    with pytest.raises(ValueError, match="prompt=3"):
        trace.heatmap(tmp_path / "x.png", prompt=3)
    with pytest.raises(ValueError, match="token labels"):
        trace.heatmap(tmp_path / "x.png", prompt=1, tokens=["just one"])


def test_labels_wrap_and_are_never_cut():
    label = "Rewrite the date 2024-07-04 as month/day/year. Then say it twice, slowly, for the people at the back."
    wrapped = _wrap(label)
    assert wrapped.count("\n") >= 1 and wrapped.replace("\n", " ") == label
