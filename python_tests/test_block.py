"""The attention block, its cache, context tokens and the top-K schedule."""
import dataclasses

import pytest
import torch

import gaze_ext
from gaze_ext.block import GazeKVCache
from gaze_ext.model import GazeLM
from gaze_ext.multimodal import CONTEXT, TEXT, VISUAL, ContextTokens, build_multimodal_layout
from gaze_ext.schedule import TopKSchedule
from helpers import DEVICES, cuda_ready, generator


def samples(gen, visual_dim=8, device="cpu", dtype=torch.float32):
    """Ragged batch: images of different sizes, several per sample, video frames."""
    f = lambda *s: torch.randn(*s, visual_dim, generator=gen).to(device, dtype)  # noqa: E731
    t = lambda *ids: torch.tensor(ids, device=device)  # noqa: E731
    return [
        [t(1, 2, 3), f(4, 6), t(4, 5), f(3, 2), t(6)],
        [t(1), f(3, 4, 4), t(7, 8, 9, 10)],
        [f(5, 5), t(11, 12)],
    ]


def exact_dtype(device):
    """The dtype the model checks run in: float64 on the CPU; the CUDA kernels take no
    float64 (DESIGN.md), so float32 there."""
    return torch.float64 if device == "cpu" else torch.float32


def assert_matches(actual, expected):
    """assert_close in float64; in float32 (CUDA: fast-math exp2 in the kernels) the largest
    difference within 1e-4 of the largest magnitude (float32 on the CPU gives ~6e-7)."""
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected)
    else:
        assert actual.shape == expected.shape
        error = (actual - expected).abs().max().item()
        assert error <= 1e-4 * expected.abs().max().item(), error


def tiny_model(share_kv=True, region_shape=(2, 2, 2), seed=0, device="cpu", dtype=torch.float32,
               num_context=3):
    torch.manual_seed(seed)
    return GazeLM(vocab_size=16, visual_dim=8, d_model=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, mlp_hidden=48, num_context=num_context,
                  region_shape=region_shape, share_kv=share_kv).to(device, dtype)


def test_layout_goes_to_the_device_asked_for():
    plan = [[("text", 2), ("visual", 1, 2, 3)]]
    layout = build_multimodal_layout(plan, num_context=2, device="meta")
    assert {layout.kinds.device.type, layout.dense_mask.device.type,
            layout.gaze.region_ptr.device.type} == {"meta"}
    assert build_multimodal_layout(plan, num_context=2).kinds.device.type == "cpu"


def test_context_tokens_reject_a_part_of_another_rank():
    with pytest.raises(ValueError, match=r"a part must be .* got \(8,\)"):
        ContextTokens(d_model=8, num_tokens=2)([[torch.zeros(8)]])


def test_layout_rejects_an_unknown_part():
    with pytest.raises(ValueError, match=r"unknown part \('audio', 3\)"):
        build_multimodal_layout([[("text", 2), ("audio", 3)]])


def test_layout_marks_kinds_groups_and_masks():
    layout = build_multimodal_layout([[("text", 2), ("visual", 2, 2, 3), ("text", 1)]],
                                     num_context=2, region_shape=(2, 2, 2))
    kinds = layout.kinds[0].tolist()
    assert kinds == [TEXT] * 2 + ([VISUAL] * 6 + [CONTEXT] * 2) * 2 + [TEXT]
    assert layout.groups[0].tolist() == [-1, -1] + [0] * 8 + [1] * 8 + [-1]
    mask = layout.dense_mask[0, 0]
    ctx = 16  # second context token of frame 1
    assert mask[ctx].nonzero().flatten().tolist() == list(range(10, 17))
    assert mask[9].nonzero().flatten().tolist() == list(range(2, 10))  # of frame 0 (group 0)
    assert mask[5].nonzero().flatten().tolist() == list(range(6))     # visual: dense causal
    gaze = layout.gaze
    assert gaze.fixed_tokens[0].tolist() == [0, 1, 8, 9, 16, 17, 18]   # text + context
    # one region spans both frames (r_t = 2): columns 0-1 and 2 of the 2x3 frames
    assert gaze.region_ptr[0].tolist() == [0, 8, 12]
    gaze_ext.validate_layout(gaze)


def test_visual_prefix_and_frames_give_each_row_its_dense_mask_row():
    """What the block computes in O(L) instead of the [L, L] mask: visual rows by a causal
    attention over the prefix, context rows by one region of frames each, up to themselves."""
    layout = build_multimodal_layout([[("text", 2), ("visual", 2, 2, 2), ("text", 1),
                                       ("visual", 1, 1, 3), ("text", 2)],
                                      [("visual", 1, 2, 1), ("text", 3)]], num_context=2,
                                     region_shape=(1, 2, 2))
    L = layout.seq_len
    gaze_ext.validate_layout(layout.frames)
    assert layout.frames.fixed_tokens.shape[1] == 0
    visual_positions = torch.nonzero(layout.kinds == VISUAL)[:, 1]
    assert layout.visual_prefix == int(visual_positions.max()) + 1 < L  # trailing text left out
    frames = layout.frames
    for b in range(2):
        mask = layout.dense_mask[b, 0]
        for i in torch.nonzero(layout.kinds[b] == VISUAL).flatten().tolist():
            assert mask[i].nonzero().flatten().tolist() == list(range(i + 1))
        rows, frame = layout.context_rows[b], layout.context_frame[b]
        real = rows < L
        assert rows[real].tolist() == torch.nonzero(layout.kinds[b] == CONTEXT).flatten().tolist()
        assert (frame[~real] == -1).all() and (frame[real] >= 0).all()
        for i, r in zip(rows[real].tolist(), frame[real].tolist()):
            ptr = frames.region_ptr[b]
            region = frames.region_tokens[b, ptr[r]:ptr[r + 1]].tolist()
            assert [t for t in region if t <= i] == mask[i].nonzero().flatten().tolist()


def test_padding_rows_see_themselves_and_text_rows_are_causal():
    # the text-only sample has no context row: its list is all padding
    layout = build_multimodal_layout([[("visual", 1, 2, 2), ("text", 1)], [("text", 8)]],
                                     num_context=1, region_shape=(1, 2, 2))
    L = layout.seq_len
    assert layout.context_rows[1].tolist() == [L] * layout.context_rows.shape[1]
    assert layout.frames.num_regions == 1 and layout.frames.region_ptr[1].tolist() == [0, 0]
    mask = layout.dense_mask
    for b in range(2):  # text rows: every position up to the query's
        for i in torch.nonzero(layout.kinds[b] == TEXT).flatten().tolist():
            assert mask[b, 0, i].nonzero().flatten().tolist() == list(range(i + 1))
    padding = torch.nonzero(layout.kinds[0] == 0).flatten().tolist()
    assert padding and all(mask[0, 0, i].nonzero().flatten().tolist() == [i] for i in padding)


def test_long_video_layout_is_linear_in_the_sequence():
    """A 32K-token video: no tensor of the layout grows with L^2 (the masks of the first
    layouts took gigabytes); the block reads nothing else of it."""
    layout = build_multimodal_layout([[("text", 64), ("visual", 32, 32, 32), ("text", 64)]])
    L = layout.seq_len
    tensors = [layout.kinds, layout.groups, layout.text_rows, layout.context_rows,
               layout.context_frame, *layout.gaze[:4], *layout.frames[:4]]
    assert max(t.numel() for t in tensors) <= 2 * L
    assert layout.frames.num_regions == 32 and layout.visual_prefix == L - 64 - 4


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
    dtype = exact_dtype(device)
    model = tiny_model(share_kv, device=device, dtype=dtype)
    x, layout = model.embed_batch(samples(generator(1), device=device, dtype=dtype))
    out = model(x, layout, topk)
    ref = model(x, layout, topk, reference=True)
    valid = torch.arange(x.shape[1], device=device)[None] < layout.lengths[:, None]
    assert_matches(out[valid], ref[valid])
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad((out[valid] ** 2).sum(), params, allow_unused=True,
                                retain_graph=True)
    ref_grads = torch.autograd.grad((ref[valid] ** 2).sum(), params, allow_unused=True)
    for p, g, r in zip(params, grads, ref_grads):
        assert g is not None, "every parameter gets a gradient"
        assert_matches(g, r)


def random_samples(gen, visual_dim=8):
    """1-3 samples of 0-4 parts each: text, images and videos of random sizes in any order
    (samples with no text, no visual or nothing at all but one text token)."""
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    batch = []
    for _ in range(r(1, 3)):
        parts = []
        for _ in range(r(0, 4)):
            if r(0, 1):
                parts.append(torch.randint(0, 16, (r(1, 5),), generator=gen))
            else:
                shape = (r(1, 3), r(1, 5), r(1, 5)) if r(0, 1) else (r(1, 5), r(1, 5))
                parts.append(torch.randn(*shape, visual_dim, generator=gen, dtype=torch.float64))
        batch.append(parts or [torch.tensor([1])])
    return batch


def random_case(seed):
    """(model, x, layout, topk) of random_samples, with 0-3 context tokens a frame."""
    gen = generator(500 + seed)
    model = tiny_model(bool(seed % 2), (1 + seed % 2, 2, 3), seed, dtype=torch.float64,
                       num_context=[3, 0, 1, 2][seed % 4])
    x, layout = model.embed_batch(random_samples(gen))
    return model, x, layout, [None, 1, 3][seed % 3]


RANDOM_SEEDS = range(12)


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_block_on_random_multimodal_batches_matches_dense_reference(seed):
    """Ragged batches of random plans: where the prefix of visual rows ends, context rows of
    frames of every size, padding, in float64 on the CPU, outputs and gradients."""
    model, x, layout, topk = random_case(seed)
    out, ref = model(x, layout, topk), model(x, layout, topk, reference=True)
    valid = torch.arange(x.shape[1])[None] < layout.lengths[:, None]
    torch.testing.assert_close(out[valid], ref[valid])
    params = list(model.parameters())
    grads = torch.autograd.grad(out[valid].square().sum(), params, allow_unused=True,
                                retain_graph=True)  # the embedding's graph is shared
    ref_grads = torch.autograd.grad(ref[valid].square().sum(), params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_random_multimodal_batches_cover_the_cases_they_claim():
    """The seeds above draw: several samples whose visual tokens end at different places,
    padding inside the visual prefix, a sample without visual tokens, text before a visual,
    frames with and without context tokens, and several frames per sample."""
    seen = set()
    for seed in RANDOM_SEEDS:
        _, _, layout, _ = random_case(seed)
        kinds, P = layout.kinds, layout.visual_prefix
        has_visual = (kinds == VISUAL).any(1)
        if kinds.shape[0] > 1:
            seen.add("batch")
            ends = [int(torch.nonzero(k == VISUAL).max()) + 1 for k in kinds if (k == VISUAL).any()]
            if len(set(ends)) > 1:
                seen.add("visual ends differ")
        if ((kinds[:, :P] == 0).any()) if P else False:
            seen.add("padding inside the prefix")
        if not has_visual.all():
            seen.add("sample without visual")
        if ((kinds == TEXT).float().cumsum(1) * (kinds == VISUAL)).any():
            seen.add("text before a visual")
        seen.add("context" if (kinds == CONTEXT).any() else "no context")
        if (layout.frames.region_ptr.shape[-1] - 1) > 1:
            seen.add("several frames")
    assert seen == {"batch", "visual ends differ", "padding inside the prefix",
                    "sample without visual", "text before a visual", "context", "no context",
                    "several frames"}, seen


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
    dtype = exact_dtype(device)
    model = tiny_model(share_kv, device=device, dtype=dtype)
    batch = samples(generator(3), device=device, dtype=dtype)
    steps, topk = 6, 1
    tokens, logits = model.generate(batch, steps, topk=topk, return_logits=True)
    for t in range(steps):
        grown = [s + [tokens[b, :t]] if t else s for b, s in enumerate(batch)]
        x, layout = model.embed_batch(grown)
        full = model(x, layout, topk)
        last = full[torch.arange(len(batch)), layout.lengths - 1]
        assert_matches(last, logits[:, t])


def test_generation_runs_one_decode_step_per_token_after_the_first(monkeypatch):
    """The prompt's pass gives the first token; each later one costs one cached step, and no
    step runs after the last token (its logits would be thrown away)."""
    began = []
    begin_step = GazeKVCache.begin_step
    monkeypatch.setattr(GazeKVCache, "begin_step", lambda self: began.append(1) or begin_step(self))
    model = tiny_model()
    tokens = model.generate(samples(generator(3)), 5, topk=1)
    assert tokens.shape[1] == 5 and len(began) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_generation_under_autocast_keeps_its_cache_in_the_autocast_dtype(device, monkeypatch):
    """Inside torch.autocast the projections give bfloat16 keys and values: generate keeps
    the cache in bfloat16 (a float32 cache would be cast whole by every decode step), and
    its logits match recomputing the sequence under autocast."""
    model = tiny_model(device=device)
    batch = samples(generator(3), device=device)
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a: caches.append(new_cache(*a)) or caches[-1])
    steps = 4
    with torch.autocast(device, dtype=torch.bfloat16):
        tokens, logits = model.generate(batch, steps, topk=1, return_logits=True)
        assert caches[0].k[0].dtype == torch.bfloat16
        for t in range(steps):
            grown = [s + [tokens[b, :t]] if t else s for b, s in enumerate(batch)]
            x, layout = model.embed_batch(grown)
            full = model(x, layout, 1)
            last = full[torch.arange(len(batch)), layout.lengths - 1]
            torch.testing.assert_close(last.float(), logits[:, t].float(), atol=0.05, rtol=0.05)


def test_decode_step_under_autocast_writes_a_float32_cache():
    """A cache the caller made in float32 takes the step's bfloat16 keys and values."""
    model = tiny_model()
    x, layout = model.embed_batch(samples(generator(4)))
    cache = model.new_cache(x.shape[0], layout.seq_len + 1, dtype=torch.float32)
    cache.start(layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, layout, 1, cache)
        cache.begin_step()
        step = model(model.embed(torch.tensor([1, 2, 3]))[:, None], None, 1, cache)
    rows = cache.length[:, None, None, None].expand(-1, cache.k[0].shape[1], 1, cache.k[0].shape[3])
    assert cache.k[0].dtype == torch.float32 and torch.isfinite(step).all()
    assert cache.k[0].gather(2, rows).abs().sum() > 0  # the step's keys were written


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
    assert TopKSchedule(target=1, num_regions=16, kind="constant")(0) == 1  # the least K
    with pytest.raises(ValueError):
        TopKSchedule(target=0, num_regions=16)
    with pytest.raises(ValueError):
        TopKSchedule(target=2, num_regions=16, kind="exp")


def test_context_tokens_take_the_dtype_of_the_frames():
    ctx = ContextTokens(d_model=4, num_tokens=2)  # float32 parameters
    image = torch.randn(2, 3, 4).to(torch.bfloat16)
    x, _ = ctx([[image]])
    assert x.dtype == torch.bfloat16 and x.shape == (1, 6 + 2, 4)
    torch.testing.assert_close(x[0, 6:], ctx.tokens.to(torch.bfloat16))


def test_layouts_are_cached_by_plan():
    plans = [[("text", 2), ("visual", 1, 2, 2)], [("text", 3)]]
    first = build_multimodal_layout(plans, num_context=1, region_shape=(1, 2, 2))
    again = build_multimodal_layout([list(p) for p in plans], num_context=1, region_shape=[1, 2, 2])
    assert again is first
    assert build_multimodal_layout(plans, num_context=2, region_shape=(1, 2, 2)) is not first


def test_text_only_dense_block_is_causal_sdpa_with_rotary_embeddings():
    """An independent check of the projections, rotary embedding and scale, which the
    block and its reference_forward share: text alone with topk=None is causal attention."""
    torch.manual_seed(0)
    block = gaze_ext.block.GazeAttentionBlock(d_model=16, num_heads=4, num_kv_heads=2).double()
    layout = build_multimodal_layout([[("text", 7)]], region_shape=(1, 2, 2))
    x = torch.randn(1, 7, 16, generator=generator(5), dtype=torch.float64)

    def rope(t):  # standard half-split RoPE: pairs (i, i + D/2) rotated by pos * theta^(-2i/D)
        D = t.shape[-1]
        freqs = 10000.0 ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
        z = torch.complex(t[..., : D // 2], t[..., D // 2:])
        angles = torch.arange(7.0, dtype=torch.float64)[:, None] * freqs
        z = z * torch.polar(torch.ones_like(angles), angles)
        return torch.cat([z.real, z.imag], -1)

    heads = lambda proj, h: proj(x).view(1, 7, h, 4).transpose(1, 2)  # noqa: E731
    q, k, v = heads(block.q_proj, 4), heads(block.k_proj, 2), heads(block.v_proj, 2)
    out = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True,
                                                           enable_gqa=True)
    expected = block.o_proj(out.transpose(1, 2).reshape(1, 7, 16))
    torch.testing.assert_close(block(x, layout, None), expected)


def test_block_rejects_query_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple"):
        gaze_ext.block.GazeAttentionBlock(d_model=24, num_heads=4, num_kv_heads=3)


def test_selection_is_recorded_only_when_asked():
    model = tiny_model()
    x, layout = model.embed_batch(samples(generator(6)))
    block = model.layers[0].attn
    block(x, layout, 1)
    assert block.last_selection is None
    block.record_selection = True
    block(x, layout, 1)
    text_rows = layout.text_rows.shape[1]
    assert block.last_selection.shape == (3, block.num_kv_heads, text_rows, 1)


def test_cache_fixed_list_has_room_for_every_step_and_no_more():
    """Its -1 padding costs on CUDA like keys, so the list is as wide as the most fixed
    tokens of a prompt plus the steps left before the longest sample fills the cache."""
    layout = build_multimodal_layout([[("text", 2), ("visual", 1, 2, 2), ("text", 1)],
                                      [("text", 1)]], num_context=1, region_shape=(1, 2, 2))
    cache = GazeKVCache(1, 2, 1, 4, max_len=12)
    cache.start(layout)  # lengths 8 and 1, fixed tokens 4 and 1: 4 + (12 - 8) entries
    assert cache.fixed_tokens.shape == (2, 8)
    for _ in range(4):
        cache.begin_step()
        cache.end_step()
    assert cache.fixed_tokens[0].tolist() == [0, 1, 6, 7, 8, 9, 10, 11]
    assert cache.fixed_tokens[1].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    with pytest.raises(RuntimeError, match="full"):
        cache.begin_step()


def test_cache_holds_a_prompt_of_max_len_and_then_is_full():
    layout = build_multimodal_layout([[("text", 2), ("visual", 1, 2, 2)]], num_context=1,
                                     region_shape=(1, 2, 2))
    cache = GazeKVCache(1, 1, 1, 4, max_len=layout.seq_len)
    cache.start(layout)
    with pytest.raises(RuntimeError, match="full"):
        cache.begin_step()
    with pytest.raises(ValueError, match="max_len"):
        GazeKVCache(1, 1, 1, 4, max_len=layout.seq_len - 1).start(layout)
    with pytest.raises(RuntimeError, match="before start"):
        GazeKVCache(1, 1, 1, 4, max_len=layout.seq_len).begin_step()


def test_cache_start_compacts_fixed_tokens_with_padding_inside():
    layout = build_multimodal_layout([[("text", 2), ("visual", 1, 2, 2), ("text", 1)]],
                                     num_context=1, region_shape=(1, 2, 2))
    fixed = layout.gaze.fixed_tokens  # [[0, 1, 6, 7]]
    holey = torch.tensor([[-1, 0, -1, 1, 6, -1, 7]], dtype=torch.int32)
    layout = dataclasses.replace(layout, gaze=layout.gaze._replace(fixed_tokens=holey))
    cache = GazeKVCache(1, 1, 1, 4, max_len=12)
    cache.start(layout)
    assert cache.fixed_count.tolist() == [4]
    assert cache.fixed_tokens[0, :4].tolist() == fixed[0].tolist()
    cache.begin_step()
    assert cache.fixed_tokens[0, :5].tolist() == fixed[0].tolist() + [8]
    assert (cache.fixed_tokens[0, 5:] == -1).all()


def test_cache_start_expands_a_layout_shared_by_the_batch():
    """A hand-made layout whose gaze part has no batch axis (one layout for every sample):
    the cache holds it per sample, as it holds the same layout stacked."""
    plan = [("text", 2), ("visual", 1, 2, 2), ("text", 1)]
    layout = build_multimodal_layout([plan, plan], num_context=1, region_shape=(1, 2, 2))
    shared = layout.gaze._replace(**{f: getattr(layout.gaze, f)[0] for f in
                                     ("region_ptr", "region_tokens", "region_pos",
                                      "fixed_tokens")})
    caches = []
    for gaze in (layout.gaze, shared):
        cache = GazeKVCache(1, 2, 1, 4, max_len=12)
        cache.start(dataclasses.replace(layout, gaze=gaze))
        caches.append(cache)
    for field in ("region_ptr", "region_tokens", "region_pos", "fixed_tokens", "fixed_count"):
        got, want = getattr(caches[1], field), getattr(caches[0], field)
        assert got.shape[0] == 2 and torch.equal(got, want), field


def test_cache_can_be_restarted_for_a_new_prompt():
    long = build_multimodal_layout([[("text", 5)]])
    short = build_multimodal_layout([[("text", 2), ("visual", 1, 2, 2)]], num_context=1,
                                    region_shape=(1, 2, 2))
    cache, fresh = GazeKVCache(1, 1, 1, 4, max_len=12), GazeKVCache(1, 1, 1, 4, max_len=12)
    cache.start(long)
    for _ in range(3):
        cache.begin_step()
        cache.end_step()
    cache.start(short)
    fresh.start(short)
    assert not cache.decoding
    assert torch.equal(cache.fixed_tokens, fresh.fixed_tokens)
    assert cache.fixed_count.tolist() == fresh.fixed_count.tolist() == [3]
    assert cache.length.tolist() == [7]


def test_schedule_values_inside_the_decay_and_without_one():
    linear = TopKSchedule(target=2, num_regions=16, dense_steps=10, decay_steps=100)
    cosine = TopKSchedule(target=2, num_regions=16, dense_steps=10, decay_steps=100, kind="cosine")
    assert linear(40) == 12   # 16 - 0.3 * 14 = 11.8, rounded
    assert cosine(40) == 13   # 16 - (0.5 - 0.5 cos(0.3 pi)) * 14 = 13.1
    at_once = TopKSchedule(target=3, num_regions=16, dense_steps=5, decay_steps=0)
    assert at_once(4) is None and at_once(5) == 3 and at_once(6) == 3
    with pytest.raises(ValueError):
        TopKSchedule(target=2, num_regions=16, dense_steps=-1)
    with pytest.raises(ValueError):
        TopKSchedule(target=2, num_regions=16, decay_steps=-1)


@pytest.mark.skipif(not cuda_ready(), reason="needs a GPU and the CUDA kernels")
def test_decode_step_never_synchronizes_and_replays_in_a_cuda_graph():
    """A GazeLM decode step (the cache's begin_step, every layer's projections, region_topk
    and gaze_attention, end_step) makes no host synchronization, so eager decoding keeps
    the GPU fed, and the whole step captured once in a CUDA graph and replayed advances
    the cache as eager steps do: the same logits step after step."""
    gen = generator(5)
    model = tiny_model(device="cuda")
    x, layout = model.embed_batch(samples(gen, device="cuda"))
    B, steps = x.shape[0], 4
    tokens = torch.randint(0, 16, (steps, B), generator=gen).cuda()

    def prefilled():
        cache = model.new_cache(B, layout.seq_len + steps, x.device)
        cache.start(layout)
        model(x, layout, 1, cache)
        return cache

    def decode(cache, token):
        cache.begin_step()
        logits = model(model.embed(token)[:, None], None, 1, cache)
        cache.end_step()
        return logits

    with torch.no_grad():
        eager = prefilled()
        want = [decode(eager, token) for token in tokens]
        side = torch.cuda.Stream()  # warm-up on a side stream, before the capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode(prefilled(), tokens[0])
        torch.cuda.current_stream().wait_stream(side)

        cache = prefilled()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            first = decode(cache, tokens[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(first, want[0])

        token = tokens[1].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode(cache, token)
        for step in range(1, steps):
            token.copy_(tokens[step])
            graph.replay()
            torch.testing.assert_close(logits, want[step], atol=1e-5, rtol=1e-5)
        assert torch.equal(cache.length, eager.length)
