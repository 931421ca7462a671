"""The attention block, its cache, context tokens and the top-K schedule."""
import pytest
import torch

import gaze_ext
from gaze_ext.block import GazeKVCache
from gaze_ext.model import GazeLM
from gaze_ext.multimodal import CONTEXT, TEXT, VISUAL, ContextTokens, build_multimodal_layout
from gaze_ext.schedule import TopKSchedule
from helpers import DEVICES, generator


def samples(gen, visual_dim=8, device="cpu", dtype=torch.float32):
    """Ragged batch: images of different sizes, several per sample, video frames."""
    f = lambda *s: torch.randn(*s, visual_dim, generator=gen).to(device, dtype)  # noqa: E731
    t = lambda *ids: torch.tensor(ids, device=device)  # noqa: E731
    return [
        [t(1, 2, 3), f(4, 6), t(4, 5), f(3, 2), t(6)],
        [t(1), f(3, 4, 4), t(7, 8, 9, 10)],
        [f(5, 5), t(11, 12)],
    ]


def tiny_model(share_kv=True, region_shape=(2, 2, 2), seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return GazeLM(vocab_size=16, visual_dim=8, d_model=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, mlp_hidden=48, num_context=3, region_shape=region_shape,
                  share_kv=share_kv).to(device, dtype)


def test_layout_marks_kinds_groups_and_masks():
    layout = build_multimodal_layout([[("text", 2), ("visual", 2, 2, 3), ("text", 1)]],
                                     num_context=2, region_shape=(2, 2, 2))
    kinds = layout.kinds[0].tolist()
    assert kinds == [TEXT] * 2 + ([VISUAL] * 6 + [CONTEXT] * 2) * 2 + [TEXT]
    assert layout.groups[0].tolist() == [-1, -1] + [0] * 8 + [1] * 8 + [-1]
    mask = layout.dense_mask[0, 0]
    ctx = 16  # second context token of frame 1
    assert mask[ctx].nonzero().flatten().tolist() == list(range(10, 17))
    assert mask[5].nonzero().flatten().tolist() == list(range(6))     # visual: dense causal
    gaze = layout.gaze
    assert gaze.fixed_tokens[0].tolist() == [0, 1, 8, 9, 16, 17, 18]   # text + context
    # one region spans both frames (r_t = 2): columns 0-1 and 2 of the 2x3 frames
    assert gaze.region_ptr[0].tolist() == [0, 8, 12]
    gaze_ext.validate_layout(gaze)


def test_dense_rows_are_the_non_text_rows_of_the_dense_mask():
    layout = build_multimodal_layout([[("text", 2), ("visual", 1, 2, 2), ("text", 1)],
                                      [("visual", 1, 1, 2), ("text", 3)]], num_context=1,
                                     region_shape=(1, 2, 2))
    L = layout.seq_len
    for b in range(2):
        rows = layout.dense_rows[b]
        real = rows < L
        assert rows[real].tolist() == torch.nonzero(layout.kinds[b] != TEXT).flatten().tolist()
        mask = layout.dense_row_mask[b, 0]
        assert torch.equal(mask[real], layout.dense_mask[b, 0, rows[real]])
        assert all(m.nonzero().flatten().tolist() == [0] for m in mask[~real])


@pytest.mark.parametrize("sample", [[("visual", 2, 2)], [("text", 3)]], ids=["visual", "text"])
def test_block_without_text_or_visual_rows(sample):
    """Batches with no text row (nothing routed) or no visual row (nothing dense)."""
    model = tiny_model(dtype=torch.float64)
    gen = generator(3)
    parts = [torch.randn(2, 2, 8, generator=gen, dtype=torch.float64) if kind == "visual"
             else torch.tensor([1, 2, 3]) for kind, *_ in sample]
    x, layout = model.embed_batch([parts])
    torch.testing.assert_close(model(x, layout, 1), model(x, layout, 1, reference=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("topk", [None, 1, 2])
def test_block_matches_dense_reference_outputs_and_gradients(device, share_kv, topk):
    """topk=None is dense (every region selected); with routing both pick the same regions."""
    model = tiny_model(share_kv, device=device, dtype=torch.float64)
    x, layout = model.embed_batch(samples(generator(1), device=device, dtype=torch.float64))
    out = model(x, layout, topk)
    ref = model(x, layout, topk, reference=True)
    valid = torch.arange(x.shape[1], device=device)[None] < layout.lengths[:, None]
    torch.testing.assert_close(out[valid], ref[valid])
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad((out[valid] ** 2).sum(), params, allow_unused=True,
                                retain_graph=True)
    ref_grads = torch.autograd.grad((ref[valid] ** 2).sum(), params, allow_unused=True)
    for p, g, r in zip(params, grads, ref_grads):
        assert g is not None, "every parameter gets a gradient"
        torch.testing.assert_close(g, r)


def test_gradients_reach_projections_and_context_tokens():
    model = tiny_model()
    x, layout = model.embed_batch(samples(generator(2)))
    model(x, layout, topk=1).square().mean().backward()
    attn = model.layers[0].attn
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
              model.context.tokens):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("share_kv", [True, False])
def test_generation_with_cache_matches_recomputation(device, share_kv):
    model = tiny_model(share_kv, device=device, dtype=torch.float64)
    batch = samples(generator(3), device=device, dtype=torch.float64)
    steps, topk = 6, 1
    tokens, logits = model.generate(batch, steps, topk=topk, return_logits=True)
    for t in range(steps):
        grown = [s + [tokens[b, :t]] if t else s for b, s in enumerate(batch)]
        x, layout = model.embed_batch(grown)
        full = model(x, layout, topk)
        last = full[torch.arange(len(batch)), layout.lengths - 1]
        torch.testing.assert_close(last, logits[:, t])


def test_cache_steps_append_fixed_tokens_in_place():
    layout = build_multimodal_layout([[("text", 2), ("visual", 1, 2, 2), ("text", 1)],
                                      [("text", 1)]], num_context=1, region_shape=(1, 2, 2))
    cache = GazeKVCache(1, 2, 1, 4, max_len=12)
    cache.start(layout)
    fixed_before = cache.fixed_tokens.data_ptr()
    assert cache.length.tolist() == [8, 1]
    assert cache.fixed_tokens[0, :4].tolist() == [0, 1, 6, 7] and cache.fixed_count.tolist() == [4, 1]
    cache.begin_step()
    cache.end_step()
    assert cache.fixed_tokens[0, :5].tolist() == [0, 1, 6, 7, 8]
    assert cache.fixed_tokens[1, :2].tolist() == [0, 1] and cache.length.tolist() == [9, 2]
    assert cache.fixed_tokens.data_ptr() == fixed_before


def test_compiled_block_forward_matches_eager():
    torch._dynamo.reset()
    model = tiny_model()
    x, layout = model.embed_batch(samples(generator(4)))
    block = model.layers[0].attn
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, layout, 2), block(x, layout, 2))


def test_context_tokens_follow_each_frame():
    ctx = ContextTokens(d_model=5, num_tokens=2)
    text, video = torch.randn(3, 5), torch.randn(2, 2, 2, 5)
    x, layout = ctx([[text, video]])
    assert x.shape == (1, 3 + 2 * (4 + 2), 5)
    torch.testing.assert_close(x[0, 7:9], ctx.tokens)
    torch.testing.assert_close(x[0, 13:15], ctx.tokens)
    torch.testing.assert_close(x[0, 9:13], video[1].reshape(4, 5))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_goes_from_dense_to_target(kind):
    s = TopKSchedule(target=2, num_regions=16, dense_steps=10, decay_steps=100, kind=kind)
    assert s(0) is None and s(9) is None
    ks = [s(step) for step in range(10, 111)]
    assert all(k is None or 2 <= k < 16 for k in ks)
    values = [16 if k is None else k for k in ks]
    assert values == sorted(values, reverse=True) and ks[-1] == 2 and s(10_000) == 2
    if kind == "cosine":  # slow start: still near dense after 10% of the decay
        assert values[10] > 16 - 0.1 * 14
    else:
        assert values[50] == 9


def test_constant_schedule_and_bad_arguments():
    s = TopKSchedule(target=2, num_regions=16, kind="constant")
    assert s(0) == 2
    with pytest.raises(ValueError):
        TopKSchedule(target=0, num_regions=16)
    with pytest.raises(ValueError):
        TopKSchedule(target=2, num_regions=16, kind="exp")
