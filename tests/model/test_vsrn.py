"""Tests of model/vsrn.py against the paper and the reference code's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.vsrn import (
    END_ID,
    PAD_ID,
    START_ID,
    FP32BatchNorm1d,
    RegionRelationReasoning,
    VSRN,
    VSRNConfig,
    caption_targets,
    count_parameters,
    gru_forward,
    order_regions,
    run_gru,
)

TINY = dict(img_dim=24, embed_size=16, word_dim=8, vocab_size=40, caption_hidden=12, caption_word_dim=6)


def _captions(lengths: list[int], vocab: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0] = START_ID
        tokens[i, 1:n - 1] = torch.randint(4, vocab, (n - 2,), generator=g)
        tokens[i, n - 1] = END_ID
    return tokens, torch.tensor(lengths)


def test_parameter_counts_equal_the_reference() -> None:
    model = VSRN(VSRNConfig())  # paper configuration: 2048 / 2048 / 300 / 4 RRR / vocab 10006
    assert count_parameters(model.image_encoder) == 96_532_480
    assert count_parameters(model.text_encoder) == 17_440_200
    assert count_parameters(model.caption_generator) == 13_321_950
    assert count_parameters(VSRN(VSRNConfig.flickr30k())) == 125_601_401


def test_reasoning_layer_is_identity_at_init_and_matches_equation_3() -> None:
    torch.manual_seed(0)
    layer = RegionRelationReasoning(8)
    v = torch.randn(3, 5, 8)
    assert torch.allclose(layer(v), v)  # BN scale and shift start at zero
    with torch.no_grad():
        layer.residual_norm.weight.uniform_(0.5, 1.5)
        layer.residual_norm.bias.uniform_(-0.5, 0.5)
    layer.eval()
    with torch.no_grad():
        layer.residual_norm.running_mean.uniform_(-0.1, 0.1)
        layer.residual_norm.running_var.uniform_(0.5, 2.0)
    # Eq. 2-3 written out per image with plain matrix algebra.
    expected = torch.empty_like(v)
    bn = layer.residual_norm
    for b in range(3):
        theta = v[b] @ layer.theta.weight.T + layer.theta.bias
        phi = v[b] @ layer.phi.weight.T + layer.phi.bias
        g = v[b] @ layer.g.weight.T + layer.g.bias
        affinity = torch.zeros(5, 5)
        for i in range(5):
            for j in range(5):
                affinity[i, j] = theta[i].dot(phi[j]) / 5
        y = affinity @ g
        w_y = y @ layer.residual_proj.weight.T + layer.residual_proj.bias
        w_y = (w_y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        expected[b] = w_y + v[b]
    assert torch.allclose(layer(v), expected, atol=1e-5)


def test_region_axis_norm_is_the_reference_l2norm_over_dim_1() -> None:
    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, num_reasoning_layers=0, aggregation="mean", caption_loss_weight=0))
    model.eval()
    regions = torch.randn(2, 5, 24)
    v = regions @ model.image_encoder.fc.weight.T + model.image_encoder.fc.bias
    v = v / v.pow(2).sum(dim=1, keepdim=True).sqrt()  # reference: across regions
    v = v / v.pow(2).sum(dim=1, keepdim=True).sqrt()  # after the (absent) GCN
    mean = v.mean(dim=1)
    expected = mean / mean.norm(dim=1, keepdim=True)
    image, reasoned = model.image_encoder(regions)
    assert torch.allclose(reasoned, v, atol=1e-6)
    assert torch.allclose(image, expected, atol=1e-6)
    per_region = VSRN(VSRNConfig(**TINY, region_norm="per_region", caption_loss_weight=0))
    _, reasoned = per_region.image_encoder(regions)
    assert torch.allclose(reasoned.norm(dim=-1), torch.ones(2, 5), atol=1e-5)


def test_flickr_variant_skips_fc_norm_and_batchnorms_the_image_vector() -> None:
    cfg = VSRNConfig.flickr30k(**{k: v for k, v in TINY.items()})
    model = VSRN(cfg)
    assert model.image_encoder.final_norm is not None and not cfg.norm_after_fc
    image, _ = model.image_encoder(torch.randn(4, 5, 24))
    assert torch.allclose(image.norm(dim=1), torch.ones(4), atol=1e-5)


def test_gsr_image_vector_is_the_final_gru_state() -> None:
    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, caption_loss_weight=0)).eval()
    regions = torch.randn(3, 6, 24)
    image, reasoned = model.image_encoder(regions)
    gru = model.image_encoder.gsr
    h = torch.zeros(3, 16)
    for t in range(6):  # Eq. 4-7 with torch's gate layout (r, z, n)
        gi = reasoned[:, t] @ gru.weight_ih_l0.T + gru.bias_ih_l0
        gh = h @ gru.weight_hh_l0.T + gru.bias_hh_l0
        r = torch.sigmoid(gi[:, :16] + gh[:, :16])
        z = torch.sigmoid(gi[:, 16:32] + gh[:, 16:32])
        n = torch.tanh(gi[:, 32:] + r * gh[:, 32:])
        h = (1 - z) * n + z * h
    assert torch.allclose(image, h / h.norm(dim=1, keepdim=True), atol=1e-5)


def test_text_encoder_accepts_unsorted_lengths_and_reads_the_last_token() -> None:
    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, caption_loss_weight=0)).eval()
    tokens, lengths = _captions([4, 9, 6, 2])
    batched = model.encode_captions(tokens, lengths)
    for i, n in enumerate(lengths.tolist()):
        out, _ = model.text_encoder.rnn(model.text_encoder.embed(tokens[i:i + 1, :n]))
        last = out[0, n - 1]
        assert torch.allclose(batched[i], last / last.norm(), atol=1e-6)


def test_region_order_by_area_and_equivariance() -> None:
    torch.manual_seed(0)
    regions = torch.randn(2, 4, 24)
    boxes = torch.tensor([[[0, 0, 1, 1], [0, 0, 3, 3], [0, 0, 2, 2], [0, 0, 4, 1]],
                          [[0, 0, 5, 5], [0, 0, 1, 2], [0, 0, 3, 1], [0, 0, 2, 2]]], dtype=torch.float32)
    ordered = order_regions(regions, "area", boxes)
    assert torch.equal(ordered[0], regions[0, [1, 2, 3, 0]])  # areas 1, 9, 4, 4 -> stable descending
    assert torch.equal(ordered[1], regions[1, [0, 3, 2, 1]])  # areas 25, 2, 3, 4
    by_area = VSRN(VSRNConfig(**TINY, region_order="area", caption_loss_weight=0)).eval()
    stored = VSRN(VSRNConfig(**TINY, caption_loss_weight=0)).eval()
    stored.load_state_dict(by_area.state_dict())
    assert torch.allclose(by_area.encode_images(regions, boxes), stored.encode_images(ordered), atol=1e-6)
    with pytest.raises(ValueError, match="needs boxes"):
        by_area.encode_images(regions)
    shuffled = order_regions(regions, "random")
    assert torch.equal(shuffled.sort(dim=1).values, regions.sort(dim=1).values)


def test_ablation_configurations_build_and_run() -> None:
    tokens, lengths = _captions([5, 7, 3])
    for cfg in (VSRNConfig(**TINY, num_reasoning_layers=0, aggregation="mean"),
                VSRNConfig(**TINY, num_reasoning_layers=1, aggregation="mean"),
                VSRNConfig(**TINY, num_reasoning_layers=0),
                VSRNConfig(**TINY, num_reasoning_layers=4, caption_loss_weight=0)):
        model = VSRN(cfg)
        out = model(torch.randn(3, 5, 24), tokens, lengths)
        assert out.image_emb.shape == out.caption_emb.shape == (3, 16)
        assert (out.caption_loss is None) == (cfg.caption_loss_weight == 0)
        assert len(model.image_encoder.reasoning) == cfg.num_reasoning_layers
    with pytest.raises(ValueError, match="aggregation"):
        VSRNConfig(aggregation="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown VSRNConfig keys: bogus"):
        VSRNConfig.from_dict({"bogus": 1})


def _reference_caption_loss(model: VSRN, reasoned: torch.Tensor, tokens: torch.Tensor,
                            lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """The reference's L_G: labels padded to max_len + 1, mask up to and including the first pad,
    teacher forcing over max_len - 1 steps whatever the captions' lengths, NLL summed / batch."""
    gen = model.caption_generator
    batch = tokens.shape[0]
    gts = np.zeros((batch, max_len + 1), dtype=np.int64)
    mask = np.zeros((batch, max_len + 1), dtype=np.float32)
    for i, n in enumerate(lengths.tolist()):
        cap = tokens[i, :n].tolist()
        if len(cap) > max_len - 1:
            cap = cap[:max_len]
            cap[-1] = END_ID
        gts[i, :len(cap)] = cap
        first_zero = np.nonzero(gts[i] == 0)[0][0]
        mask[i, :first_zero + 1] = 1
    labels, masks = torch.from_numpy(gts), torch.from_numpy(mask)
    enc_out, hidden = gen.region_rnn(gen.region_proj(reasoned))
    log_probs = []
    for t in range(max_len - 1):
        h = hidden[0]
        cat = torch.cat([enc_out, h.unsqueeze(1).repeat(1, enc_out.shape[1], 1)], dim=2)
        alpha = torch.softmax(gen.attention.score(torch.tanh(gen.attention.proj(cat))).squeeze(2), dim=1)
        context = torch.bmm(alpha.unsqueeze(1), enc_out).squeeze(1)
        step_in = torch.cat([gen.word_embed(labels[:, t]), context], dim=1).unsqueeze(1)
        out, hidden = gen.decoder_rnn(step_in, hidden)
        log_probs.append(F.log_softmax(gen.output(out.squeeze(1)), dim=1))
    logits = torch.stack(log_probs, 1)
    target, m = labels[:, 1:][:, :max_len - 1], masks[:, 1:][:, :max_len - 1]
    nll = -logits.gather(2, target.unsqueeze(2)).squeeze(2)
    return (nll * m).sum() / batch


@pytest.mark.parametrize("lengths,max_len", [([5, 9, 3, 7], 60), ([5, 14, 3, 12], 10)])
def test_caption_loss_equals_the_reference_full_unroll(lengths: list[int], max_len: int) -> None:
    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, max_caption_len=max_len)).eval()  # eval: dropout off
    tokens, lens = _captions(lengths)
    reasoned = model.image_encoder(torch.randn(4, 5, 24))[1]
    ours = model.caption_generator.loss(reasoned, tokens, lens)
    expected = _reference_caption_loss(model, reasoned, tokens, lens, max_len)
    assert torch.allclose(ours, expected, atol=1e-4)


def test_caption_targets_cut_long_captions_and_mask_the_first_pad() -> None:
    tokens, lengths = _captions([4, 7])
    ids, mask, steps = caption_targets(tokens, lengths, max_len=5)
    assert steps == 4
    assert ids[0].tolist() == tokens[0, :4].tolist() + [PAD_ID]
    assert ids[1].tolist() == tokens[1, :4].tolist() + [END_ID]  # cut to 5 tokens ending in <end>
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    ids, mask, steps = caption_targets(tokens, lengths, max_len=60)
    assert steps == 7 and mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_greedy_decoding_reproduces_a_memorised_caption() -> None:
    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, caption_dropout=0.0))
    tokens, lengths = _captions([6, 5], seed=3)
    regions = torch.randn(2, 5, 24)
    optimizer = torch.optim.Adam(model.caption_generator.parameters(), lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        loss = model(regions, tokens, lengths).caption_loss
        loss.backward()
        optimizer.step()
    model.eval()
    generated = model.generate_captions(regions)
    for i, n in enumerate(lengths.tolist()):
        assert generated.tokens[i, :n - 1].tolist() == tokens[i, 1:n].tolist()
    assert torch.allclose(generated.attention.sum(-1), torch.ones(generated.attention.shape[:2]), atol=1e-5)


def test_bf16_weights_accept_float32_inputs() -> None:
    model = VSRN(VSRNConfig(**TINY)).to(torch.bfloat16)  # buffers cast too (not DeepSpeed's way)
    tokens, lengths = _captions([5, 3])
    out = model(torch.randn(2, 5, 24), tokens, lengths)
    # The joint space leaves the model in float32 (the precision policy of model/vsrn.py).
    assert out.image_emb.dtype == out.caption_emb.dtype == torch.float32 and torch.isfinite(out.caption_loss)


# --- bf16 as DeepSpeed runs it: parameters bf16, buffers (BatchNorm statistics) float32 ---------------


def _deepspeed_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the parameters only, as DeepSpeed's engine does for `bf16: enabled` (buffers stay)."""
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_runs_in_float32_under_bf16_weights(train: bool) -> None:
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm1d(16)
    reference.weight.data.uniform_(0.5, 1.5)
    reference.bias.data.uniform_(-0.5, 0.5)
    reference.running_mean.uniform_(-0.1, 0.1)
    bn = FP32BatchNorm1d(16)
    bn.load_state_dict(reference.state_dict())
    _deepspeed_bf16(bn)
    assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    reference.weight.data = bn.weight.data.float()  # what the forward sees: the bf16-rounded weights
    reference.bias.data = bn.bias.data.float()
    bn.train(train)
    reference.train(train)
    x = (torch.randn(200, 16) * 3 + 1).to(torch.bfloat16)
    out = bn(x)
    expected = reference(x.float())  # float32 statistics of the same input
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        got, want = getattr(bn, name), getattr(reference, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    if train:  # gradients reach the bf16 parameters
        out.float().square().sum().backward()
        assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16


def test_batchnorm_of_a_module_cast_wholesale_keeps_its_statistics_in_its_buffers() -> None:
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm1d(8)
    bn = FP32BatchNorm1d(8).to(torch.bfloat16)  # running statistics bf16 as well
    x = torch.randn(50, 8).to(torch.bfloat16) * 2 + 3
    bn(x)
    reference(x.float())
    assert bn.running_mean.dtype == torch.bfloat16
    torch.testing.assert_close(bn.running_mean, reference.running_mean.to(torch.bfloat16))
    torch.testing.assert_close(bn.running_var, reference.running_var.to(torch.bfloat16))


def test_float32_batchnorm_is_nn_batchnorm() -> None:
    torch.manual_seed(0)
    reference, bn = torch.nn.BatchNorm1d(8), FP32BatchNorm1d(8)
    x = torch.randn(30, 8, requires_grad=True)
    torch.testing.assert_close(bn(x), reference(x), rtol=0, atol=0)
    assert torch.equal(bn.running_var, reference.running_var)


def test_cpu_gru_recurrence_stays_float32_under_bf16_weights() -> None:
    torch.manual_seed(0)
    gru32 = torch.nn.GRU(12, 16, batch_first=True)
    gru16 = _deepspeed_bf16(torch.nn.GRU(12, 16, batch_first=True))
    gru16.load_state_dict(gru32.state_dict())
    for param in gru32.parameters():  # the float32 GRU with exactly the bf16-rounded weights
        param.data = param.data.to(torch.bfloat16).float()
    x = torch.randn(4, 36, 12).to(torch.bfloat16)
    out, state = gru_forward(gru16, x)
    want_out, want_state = gru32(x.float())
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(state, want_state, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, want_out.to(torch.bfloat16), rtol=0, atol=0)
    # Stepping one token at a time carries the float32 state: the same as the whole sequence.
    hidden = None
    for t in range(x.shape[1]):
        _, hidden = gru_forward(gru16, x[:, t:t + 1], hidden)
    torch.testing.assert_close(hidden, want_state, rtol=1e-5, atol=1e-6)
    # The CPU sequence kernel (_GRUSequence) follows the same policy, gradients included.
    seq_out, seq_state = run_gru(gru16, x)
    assert seq_out.dtype == torch.bfloat16 and seq_state.dtype == torch.float32
    torch.testing.assert_close(seq_state, want_state, rtol=1e-5, atol=1e-6)
    seq_state.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in gru16.parameters())


def test_bf16_model_tracks_the_float32_model() -> None:
    # The same weights, rounded to bf16 and cast as DeepSpeed does: embeddings, L_G and the
    # gradients stay close to the float32 model's (what a bf16 run trains with).
    torch.manual_seed(0)
    config = VSRNConfig(**{**TINY, "caption_dropout": 0.0, "num_reasoning_layers": 2})
    model32 = VSRN(config)
    for layer in model32.image_encoder.reasoning:  # BatchNorm away from its identity init
        layer.residual_norm.weight.data.uniform_(0.5, 1.5)
    model16 = VSRN(config)
    model16.load_state_dict(model32.state_dict())
    _deepspeed_bf16(model16)
    for param in model32.parameters():
        param.data = param.data.to(torch.bfloat16).float()
    tokens, lengths = _captions([7, 5, 9, 6, 4, 8], seed=5)
    regions = torch.randn(6, 5, 24)
    out32, out16 = model32(regions, tokens, lengths), model16(regions.to(torch.float16), tokens, lengths)
    assert {out16.image_emb.dtype, out16.caption_emb.dtype, out16.caption_loss.dtype} == {torch.float32}
    assert F.cosine_similarity(out16.image_emb, out32.image_emb).min() > 0.99
    assert F.cosine_similarity(out16.caption_emb, out32.caption_emb).min() > 0.999
    assert abs(out16.caption_loss.item() - out32.caption_loss.item()) < 0.01 * out32.caption_loss.item()
    for out, model in ((out32, model32), (out16, model16)):
        (out.image_emb @ out.caption_emb.t()).trace().backward(retain_graph=True)
        out.caption_loss.backward()
    grads32 = {name: param.grad for name, param in model32.named_parameters()}
    grads16 = {name: param.grad for name, param in model16.named_parameters()}
    assert all(grad.dtype == torch.bfloat16 for grad in grads16.values())
    flat32 = torch.cat([grad.flatten() for grad in grads32.values()])
    flat16 = torch.cat([grads16[name].float().flatten() for name in grads32])
    assert F.cosine_similarity(flat16, flat32, dim=0) > 0.999
    for name, want in grads32.items():
        # Biases right before a BatchNorm have no gradient in exact arithmetic (the BN removes any
        # shift); what float32 computes for them is rounding noise. Compare the others.
        if want.norm() > 1e-4 * flat32.norm():
            assert F.cosine_similarity(grads16[name].float().flatten(), want.flatten(), dim=0) > 0.98, name


# --- the faster formulations (CPU GRU with batched weight gradients, folded RRR layers, caption
# loss after the recurrence) against the plain ones, forward and backward -------------------------


def test_gru_sequence_equals_nn_gru_with_gradients() -> None:
    from model.vsrn import _GRUSequence, run_gru

    torch.manual_seed(0)
    gru = torch.nn.GRU(7, 5, batch_first=True).double()
    x = torch.randn(3, 6, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, 5, dtype=torch.float64)
    grads = []
    for run in (gru, lambda inputs: run_gru(gru, inputs)):
        outputs, last = run(x)
        loss = (outputs * weight).sum() + 3 * last.sum()
        grads.append((outputs, last, torch.autograd.grad(loss, [x, *gru.parameters()])))
    (out_a, last_a, grads_a), (out_b, last_b, grads_b) = grads
    assert torch.allclose(out_a, out_b, atol=1e-12) and torch.allclose(last_a, last_b, atol=1e-12)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-12)
    h0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GRUSequence.apply, (x[:, :4], h0, *gru.parameters()))


@pytest.mark.parametrize("train", [True, False])
def test_folded_reasoning_layer_equals_the_plain_one(train: bool) -> None:
    torch.manual_seed(0)
    layer = RegionRelationReasoning(6).double().train(train)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.5, 0.5)
        layer.residual_norm.running_var.uniform_(0.5, 2.0)
    v = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for folded in (False, True):
        layer.folded = folded
        out = layer(v)
        results.append((out, torch.autograd.grad((out * out.detach().cos()).sum(), [v, *layer.parameters()])))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-12)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-11)
    # By default the order is chosen by cost: folded when batch x regions > D.
    from unittest import mock

    layer.folded = None
    wide = RegionRelationReasoning(32).double().train(train)
    for module, inputs, expected in ((layer, v, True), (wide, torch.randn(2, 5, 32, dtype=torch.float64), False)):
        with mock.patch.object(module, "_folded_residual", wraps=module._folded_residual) as spy:
            module(inputs)
        assert spy.called == expected


def test_folded_reasoning_layer_runs_under_cpu_autocast() -> None:
    # bench/model_speed.py's autocast path at batch 8 (folded order: 8 x 36 regions > D 256) once
    # stopped here: addmv is on no autocast list, and its operands came out float32 and bf16.
    torch.manual_seed(0)
    layer = RegionRelationReasoning(16).train()
    layer.folded = True
    v = torch.randn(4, 6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(v)
    out.float().sum().backward()
    reference = layer(v.detach())
    assert v.grad is not None and torch.isfinite(v.grad).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)  # bf16 products


def test_caption_loss_gradients_equal_the_reference_full_unroll() -> None:
    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, max_caption_len=12)).double().eval()
    tokens, lens = _captions([5, 9, 3, 7, 14])
    reasoned = torch.randn(5, 5, 16, dtype=torch.float64, requires_grad=True)
    params = [reasoned, *model.caption_generator.parameters()]
    ours = torch.autograd.grad(model.caption_generator.loss(reasoned, tokens, lens), params)
    expected = torch.autograd.grad(_reference_caption_loss(model, reasoned, tokens, lens, 12), params)
    for a, b in zip(ours, expected):
        assert torch.allclose(a, b, atol=1e-10)


def test_training_step_equals_the_benchmarks_reference_style_model() -> None:
    """bench/train_throughput.py times our model against a plain re-creation of the reference's
    modules (Conv1d reasoning layers, nn.GRU, packed text GRU, 59-step decoder); both must compute
    the same loss and gradients from the same weights."""
    import importlib.util
    from pathlib import Path

    from model.loss import hardest_negative_loss

    path = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    config = VSRNConfig(**TINY, num_reasoning_layers=2, caption_dropout=0.0, max_caption_len=12)
    ours = VSRN(config).double().train()
    with torch.no_grad():
        for layer in ours.image_encoder.reasoning:  # non-zero residual branches
            layer.residual_norm.weight.uniform_(0.5, 1.5)
            layer.residual_norm.bias.uniform_(-0.5, 0.5)
    ref = bench.ReferenceStyleVSRN(config).double().load_from(ours).train()
    tokens, lengths = _captions([14, 9, 7, 5, 4, 3])  # sorted, as the reference's loader sorts
    feats = torch.randn(6, 5, 24, dtype=torch.float64)
    labels, masks = bench.reference_caption_labels(tokens, lengths, 12)
    loss_ref = ref.loss(feats, tokens, lengths, labels, masks)
    out = ours(feats, tokens, lengths)
    loss_ours = hardest_negative_loss(out.image_emb, out.caption_emb) + out.caption_loss
    assert torch.allclose(loss_ours, loss_ref, atol=1e-10)
    loss_ref.backward()
    loss_ours.backward()
    our_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        mine = our_params.pop(ref.our_name(name))
        assert torch.allclose(p.grad.reshape(mine.shape), mine.grad, atol=1e-10), name
    assert not our_params  # every parameter compared


# --- issue 21: host-made caption inputs, bucketed widths, masked L_G, GRU module -----------------


def test_caption_bucket_widths() -> None:
    from model.vsrn import caption_bucket

    # Room for the longest caption and the pad after it (L_G's last target), in multiples of 8.
    assert [caption_bucket(n, 60) for n in (3, 7, 8, 15, 16, 22, 23, 24, 55)] == [8, 8, 16, 16, 24, 24, 24, 32, 56]
    assert [caption_bucket(n, 60) for n in (56, 63, 64, 70, 200)] == [64, 64, 128, 128, 256]  # past max_len: powers of 2
    assert len({caption_bucket(n, 60) for n in range(1, 64)}) == 8  # an epoch sees at most 8 widths up to 63 tokens


def _todays_caption_loss(model: VSRN, reasoned: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """L_G as model/vsrn.py computed it before issue 21: unrolled to the longest caption, one
    `_step` per token, the vocabulary projection on the boolean-gathered unmasked positions."""
    gen = model.caption_generator
    targets, mask, steps = caption_targets(tokens, lengths, model.config.max_caption_len)
    encoded, projected, hidden = gen._encode(reasoned)
    words = gen.word_embed(targets[:, :steps])
    states = []
    for t in range(steps):
        out, hidden, _ = gen._step(words[:, t], hidden, encoded, projected)
        states.append(out)
    valid = mask > 0
    logits = gen.output(torch.stack(states, dim=1)[valid])
    return F.cross_entropy(logits, targets[:, 1:][valid], reduction="sum") / tokens.shape[0]


@pytest.mark.parametrize("lengths,max_len", [([5, 9, 3, 7, 14], 60), ([5, 14, 3, 12, 20], 10), ([8, 8, 7], 60)])
def test_bucketed_caption_loss_and_gradients_equal_todays(lengths: list[int], max_len: int) -> None:
    from model.vsrn import caption_inputs

    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, max_caption_len=max_len)).double().eval()
    tokens, lens = _captions(lengths)
    reasoned = torch.randn(len(lengths), 5, 16, dtype=torch.float64, requires_grad=True)
    params = [reasoned, *model.caption_generator.parameters()]
    expected = _todays_caption_loss(model, reasoned, tokens, lens)
    expected_grads = torch.autograd.grad(expected, params)
    for bucket in (1, 8, 32):  # no padding past the need, the default buckets, wide buckets
        captions = caption_inputs(tokens, lens, max_len, bucket=bucket)
        assert captions.tokens.shape[1] % bucket == 0 or captions.tokens.shape[1] > max_len
        ours = model.caption_generator.loss(reasoned, captions)
        assert torch.allclose(ours, expected, atol=1e-10), bucket
        for a, b in zip(torch.autograd.grad(ours, params), expected_grads):
            assert torch.allclose(a, b, atol=1e-10), bucket


def test_caption_inputs_labels_and_last_positions() -> None:
    from model.vsrn import IGNORED_TARGET, _device_caption_inputs, caption_inputs

    tokens, lengths = _captions([4, 7, 2])
    captions = caption_inputs(tokens, lengths.numpy(), max_caption_len=5)  # host lengths: no sync
    assert captions.tokens.shape == (3, 8) and captions.last.tolist() == [3, 6, 1]
    assert torch.equal(captions.tokens[:, :7], tokens) and not captions.tokens[:, 7:].any()
    steps = 4  # min(8, max_len 5) - 1
    labels = captions.labels.tolist()
    assert labels[0] == tokens[0, 1:4].tolist() + [PAD_ID]  # up to and including the first pad
    assert labels[1] == tokens[1, 1:4].tolist() + [END_ID]  # cut to 5 tokens ending in <end>
    assert labels[2] == [END_ID, PAD_ID, IGNORED_TARGET, IGNORED_TARGET]
    # The device-token path (padding and labels made on the device from the host's facts) agrees.
    from model.vsrn import caption_bucket

    host = lengths.numpy()
    width = caption_bucket(int(host.max()), 5)
    counted = np.arange(1, steps + 1)[None, :] <= np.minimum(host, 5)[:, None]
    device = _device_caption_inputs(tokens, host - 1, counted, host > 5, width, steps, 5)
    for a, b in zip(device[:3], captions[:3]):
        assert torch.equal(a, b)
    # The counted positions the eager L_G projects: the labels that count, flattened.
    assert captions.counted.tolist() == torch.nonzero(captions.labels.reshape(-1) != IGNORED_TARGET).flatten().tolist()
    assert device.counted is None and caption_inputs(tokens, lengths, 5, counted_positions=False).counted is None
    with pytest.raises(ValueError, match="lengths must be in"):
        caption_inputs(tokens, [4, 8, 2], 60)


def test_text_encoder_equals_a_packed_gru_with_gradients() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    from model.vsrn import caption_inputs

    torch.manual_seed(0)
    model = VSRN(VSRNConfig(**TINY, caption_loss_weight=0)).double()
    encoder = model.text_encoder
    reference = torch.nn.GRU(8, 16, batch_first=True).double()
    reference.load_state_dict(encoder.rnn.state_dict())
    tokens, lengths = _captions([4, 9, 6, 2, 9])  # unsorted, as the reader gives them
    ours = encoder(caption_inputs(tokens, lengths, 60))  # padded to 16, read at each last token
    packed = pack_padded_sequence(encoder.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
    _, hidden = reference(packed)
    expected = F.normalize(hidden[-1], dim=-1)
    assert torch.allclose(ours, expected, atol=1e-12)
    weight = torch.randn_like(ours)
    grads = [torch.autograd.grad((out * weight).sum(), [encoder.embed.weight, *gru.parameters()])
             for out, gru in ((ours, encoder.rnn), (expected, reference))]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_gru_module_is_nn_gru() -> None:
    from model.vsrn import GRU

    torch.manual_seed(3)
    ours = GRU(7, 5)
    torch.manual_seed(3)
    theirs = torch.nn.GRU(7, 5, batch_first=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key  # same initialisation from the same seed
    x, h0 = torch.randn(3, 4, 7), torch.randn(1, 3, 5)
    for a, b in zip(ours(x, h0), theirs(x, h0)):
        assert torch.allclose(a, b, atol=1e-6)
