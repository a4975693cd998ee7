"""`model.compile` (issue 21): the model under torch.compile computes what the eager model does,
and compiles once per caption bucket (one graph, no graph break), on CPU with a tiny model.

Compilation counts come through public APIs only: a torch.compile backend of our own (a callable
given each captured graph) and torch.compiler.set_stance("fail_on_recompile").
"""

from __future__ import annotations

import copy

import torch

from model.loss import hardest_negative_loss
from model.vsrn import END_ID, START_ID, VSRN, VSRNConfig, caption_bucket, caption_inputs

# As small as the structure allows: compile time grows with the graph (the decoder unrolls).
TINY = dict(img_dim=12, embed_size=8, word_dim=4, vocab_size=30, caption_hidden=6, caption_word_dim=4,
            num_reasoning_layers=1, caption_dropout=0.0)
REGIONS = 4


def _batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0] = START_ID
        tokens[i, 1:n - 1] = torch.randint(4, 30, (n - 2,), generator=g)
        tokens[i, n - 1] = END_ID
    return torch.randn(len(lengths), REGIONS, 12, generator=g), tokens, torch.tensor(lengths)


def _step(model: VSRN, lengths: list[int], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    regions, tokens, lens = _batch(lengths, seed)
    model.zero_grad()
    out = model(regions, caption_inputs(tokens, lens, model.config.max_caption_len, counted_positions=False))
    loss = hardest_negative_loss(out.image_emb, out.caption_emb) + out.caption_loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_compiled_model_gives_the_eager_loss_and_gradients() -> None:
    torch.manual_seed(0)
    eager = VSRN(VSRNConfig(**TINY))
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)  # inductor, its default mode on CPU, as trainer.training.engine.compile_model
    for seed, lengths in enumerate(([5, 7, 4, 6], [3, 6, 2, 7])):  # one bucket (width 8): one compilation
        loss_eager, grads_eager = _step(eager, lengths, seed)
        loss_compiled, grads_compiled = _step(compiled, lengths, seed)
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
        for name, grad in grads_eager.items():
            torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_model_compiles_once_per_caption_bucket() -> None:
    graphs: list[tuple[int, ...]] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(tuple(t.shape[1] for t in example_inputs if t.dtype == torch.long and t.dim() == 2))
        return graph.forward  # run the captured graph as it is

    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY))
    model.compile(backend=counting_backend, dynamic=False)
    batches = [[5, 7, 4, 6], [3, 6, 2, 5], [9, 12, 4, 6], [15, 3, 4, 2], [2, 2, 3, 7], [10, 9, 8, 11]]
    buckets = [caption_bucket(max(lengths), model.config.max_caption_len) for lengths in batches]
    assert buckets == [8, 8, 16, 16, 8, 16]
    for seed, lengths in enumerate(batches):
        _step(model, lengths, seed)
    assert len(graphs) == 2  # one graph per bucket: the whole forward, no graph break
    # Other lengths in the same buckets run the compiled graphs: no recompilation.
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, lengths in enumerate(([7, 3, 3, 3], [4, 14, 9, 10])):
            _step(model, lengths, 10 + seed)
    assert len(graphs) == 2
