import pytest
import torch
import torch.nn.functional as F

import gaze_ext
from gaze_ext import build_layout, ops, reference
from gaze_ext.layout import GazeLayout
from helpers import (DEVICES, DTYPES, atol_for, cpu_threads, error_bound_check, generator,
                     high_precision, q_positions, qkv_shapes, random_batch_layout,
                     random_selection, random_tensor)


def layout_args(layout: GazeLayout, device):
    return (layout.region_ptr.to(device), layout.region_tokens.to(device),
            layout.fixed_tokens.to(device))


CASES = [
    # B, Hq, Hkv, Lq, N, D, selection heads, causal, shared layout, strided
    (2, 4, 2, 3, 50, 16, "kv", False, False, False),
    (1, 6, 2, 5, 70, 64, "q", True, False, True),
    (3, 2, 2, 4, 33, 80, "q", False, True, "last"),
    (2, 8, 1, 1, 90, 128, "kv", True, False, False),
    (1, 3, 3, 9, 20, 7, "kv", True, True, True),
    (2, 4, 4, 2, 64, 96, "q", False, False, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_backward_match_reference(device, dtype, case):
    B, Hq, Hkv, Lq, N, D, sel, causal, shared, strided = CASES[case]
    gen = generator(1000 + case)
    layout = random_batch_layout(gen, B, N, shared=shared, max_regions=12)
    Hs = Hkv if sel == "kv" else Hq
    idx = random_selection(gen, (B, Hs, Lq, 5), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N) if causal else None
    scale = 0.3 + 0.2 * case
    q = random_tensor(gen, (B, Hq, Lq, D), dtype, device, strided).requires_grad_()
    k = random_tensor(gen, (B, Hkv, N, D), dtype, device, strided).requires_grad_()
    v = random_tensor(gen, (B, Hkv, N, D), dtype, device, strided).requires_grad_()
    out, lse = ops.gaze_attention(q, k, v, *layout_args(layout, device), idx.to(device),
                                  None if q_pos is None else q_pos.to(device), scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (B, Hq, Lq, D) and lse.shape == (B, Hq, Lq)

    leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    same_leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    hp = high_precision(dtype)
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, scale)
    ref_out, ref_lse = reference.gaze_attention(*[t.to(hp) for t in leaves], *args)
    same_out, same_lse = reference.gaze_attention(*same_leaves, *args, compute_dtype=dtype)
    error_bound_check("out", out.detach().cpu(), ref_out.detach(), same_out.detach(), 2.0,
                      atol_for(dtype))
    lse_tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(lse.detach().cpu(), ref_lse.detach().float(), atol=lse_tol,
                               rtol=1e-4)

    grad_out = random_tensor(gen, (B, Hq, Lq, D), dtype, "cpu")
    finite = torch.isfinite(ref_lse.detach())
    loss_w = torch.where(finite, torch.randn(B, Hq, Lq, generator=gen), 0.0)

    def loss(o, l):
        return (o.float() * grad_out.to(o.device).float()).sum() + (
            torch.where(finite.to(o.device), l, 0).float() * loss_w.to(o.device)).sum()

    loss(out, lse).backward()
    loss(ref_out, ref_lse).backward()
    loss(same_out, same_lse).backward()
    # The backward recomputes the probabilities from the float32 lse the contract returns,
    # which the same-dtype reference (autograd through its softmax) does not: an error of an
    # ulp in that lse (2^-23 of it; lse ~ 40 at scale 1.3 in case 5) moves every probability,
    # and so each gradient, by as much relative to its size.
    lse_rounding = 2.0 ** -23 * ref_lse.detach()[finite].abs().max().item()
    for name, got, ref, same in zip("qkv", (q, k, v), leaves, same_leaves):
        atol = atol_for(dtype) + lse_rounding * ref.grad.abs().max().item()
        error_bound_check(f"d{name}", got.grad.cpu(), ref.grad, same.grad, 3.0, atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_all_regions_selected_equals_dense_sdpa(device, dtype, causal):
    """Every key in a region or fixed, every region selected: dense attention."""
    B, Hq, Hkv, Lq, D = 2, 8, 2, 6, 64
    layout = build_layout([(3, 1, 9, 7), (80, 2, 5, 6)], 150, region_shape=(1, 4, 4))
    N, R = layout.num_keys, layout.num_regions
    gen = generator(3)
    q = random_tensor(gen, (B, Hq, Lq, D), dtype, device)
    k = random_tensor(gen, (B, Hkv, N, D), dtype, device)
    v = random_tensor(gen, (B, Hkv, N, D), dtype, device)
    idx = torch.arange(R, dtype=torch.int32).expand(B, Hkv, Lq, R).contiguous()
    q_pos = torch.randint(0, N, (B, Lq), generator=gen, dtype=torch.int32) if causal else None
    out, lse = ops.gaze_attention(q, k, v, *layout_args(layout, device), idx.to(device),
                                  None if q_pos is None else q_pos.to(device))
    mask = None
    if causal:
        mask = torch.arange(N)[None, None, :] <= q_pos[:, :, None]  # [B, Lq, N]
        mask = mask[:, None].to(device)
    hp = high_precision(dtype)
    dense = F.scaled_dot_product_attention(q.to(hp), k.to(hp), v.to(hp), attn_mask=mask,
                                           enable_gqa=True)
    same = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    error_bound_check("out vs sdpa", out.cpu(), dense.cpu(), same.cpu(), 2.0, atol_for(dtype))
    logits = torch.einsum("bhid,bhnd->bhin", q.to(hp), k.to(hp).repeat_interleave(Hq // Hkv, 1))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse.cpu().double(), (logits * D ** -0.5).logsumexp(-1).cpu().double(),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_query_seeing_no_key(device):
    layout = build_layout([(10, 1, 4, 4)], 30)
    q = torch.randn(1, 2, 3, 8, device=device, requires_grad=True)
    k = torch.randn(1, 1, 30, 8, device=device, requires_grad=True)
    v = torch.randn(1, 1, 30, 8, device=device, requires_grad=True)
    idx = torch.tensor([0], dtype=torch.int32).expand(1, 1, 3, 1).contiguous().to(device)
    q_pos = torch.tensor([[-1, 5, 29]], dtype=torch.int32, device=device)
    out, lse = ops.gaze_attention(q, k, v, *layout_args(layout, device), idx, q_pos)
    assert (out[:, :, 0] == 0).all() and (lse[:, :, 0] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, 1:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 0] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_gives_rows_with_lse_minus_inf_no_gradient(device):
    """The backward op takes lse as given: a row whose lse is -inf counts as one that saw no
    key (probabilities 0, not 2^(s + inf)), even when the row has keys, as when lse comes
    from elsewhere than this forward."""
    gen = generator(31)
    B, Hq, Hkv, Lq, N, D = 1, 4, 2, 3, 40, 16
    layout = random_batch_layout(gen, B, N, max_regions=6, max_region_size=5)
    idx = random_selection(gen, (B, Hkv, Lq, 2), layout.num_regions).to(device)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=gen).to(device)
                     for H, L in ((Hq, Lq), (Hkv, N), (Hkv, N), (Hq, Lq)))
    args = layout_args(layout, device)
    out, lse = ops.gaze_attention(q, k, v, *args, idx)
    dead = lse.clone()
    dead[0, 1, 2] = float("-inf")  # head 1, row 2: it has keys
    quiet = grad.clone()
    quiet[0, 1, 2] = 0
    dq, dk, dv = torch.ops.gaze.gaze_attention_backward(grad, None, q, k, v, out, dead, *args,
                                                        idx, None, D ** -0.5)
    want = torch.ops.gaze.gaze_attention_backward(quiet, None, q, k, v, out, lse, *args, idx,
                                                  None, D ** -0.5)
    assert (dq[0, 1, 2] == 0).all()
    for got, expected in zip((dq, dk, dv), want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", [1, 2])
def test_non_finite_scores_give_nan_rows(device, threads):
    """A row with a NaN score, or a +inf one, gets out = NaN and lse = NaN, as SDPA gives, and
    NaN gradients (lse = -inf would tell the backward the row saw no key, so that its
    gradients came out 0): dq of the row, dk and dv of the keys it sees; a -inf score only
    takes its key's weight to 0. One (batch, KV head, row) task, so on 2 CPU threads its keys
    are split and the NaN states merged."""
    N, D = 6000, 16
    layout = build_layout([(0, 40, 12, 12)], N, region_shape=(1, 2, 3))
    gen = generator(41)
    idx = torch.randperm(layout.num_regions, generator=gen)[:300].int().view(1, 1, 1, 300)
    q, k, v = (torch.randn(s, generator=gen) for s in qkv_shapes(1, 4, 1, 1, N, D))
    fixed = int(layout.fixed_tokens[3])
    k[0, 0, fixed, 3] = float("inf")
    q[0, :, 0, 3] = torch.tensor([-1.0, -1.0, 1.0, -1.0])  # head 2 scores +inf, 0 and 3 -inf
    q[0, 1, 0, 5] = float("nan")
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    with cpu_threads(threads):
        out, lse = ops.gaze_attention(*leaves, *layout_args(layout, device), idx.to(device))
        grad = torch.randn(out.shape, generator=gen)
        out.backward(grad.to(device))
    nan_rows = torch.tensor([False, True, True, False])
    assert out[0, :, 0].isnan().all(-1).cpu().equal(nan_rows)
    assert lse[0, :, 0].isnan().cpu().equal(nan_rows)
    assert leaves[0].grad[0, 1:3].isnan().all()

    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx)
    ref_out, ref_lse = reference.gaze_attention(*ref, *args)
    ref_out.backward(grad.double())
    close = dict(atol=1e-5, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(out.detach().cpu().double(), ref_out.detach(), **close)
    torch.testing.assert_close(lse.detach().cpu().double(), ref_lse.detach(), **close)
    torch.testing.assert_close(leaves[0].grad.cpu().double(), ref[0].grad, **close)
    # (the reference's dense products spread a NaN row to every key: 0 * NaN)
    seen = reference.key_multiplicity(*args, N, 4)[0, 1, 0] > 0
    for got in leaves[1:]:
        assert got.grad[0, 0].isnan().any(-1).cpu().equal(seen)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_rules_repeats_and_padding(device):
    """-1 skipped; a region equal to the last one taken counts once, even across -1;
    a region listed again later counts again (as the contract says)."""
    layout = GazeLayout(torch.tensor([0, 2, 4], dtype=torch.int32),
                        torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                        torch.tensor([1, 3], dtype=torch.int32),
                        torch.tensor([4, -1], dtype=torch.int32), 5)
    gen = generator(0)
    q = torch.randn(1, 1, 4, 4, generator=gen).to(device)
    k = torch.randn(1, 1, 5, 4, generator=gen).to(device)
    v = torch.randn(1, 1, 5, 4, generator=gen).to(device)
    idx = torch.tensor([[[[0, 0, 1, -1], [0, -1, 0, 1], [1, 0, 1, -1], [-1, -1, -1, -1]]]],
                       dtype=torch.int32)
    out, _ = ops.gaze_attention(q, k, v, *layout_args(layout, device), idx.to(device))
    weights = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 2, 2, 1], [0, 0, 0, 0, 1]],
                           dtype=torch.float64)
    logits = (q[0, 0].cpu().double() @ k[0, 0].cpu().double().T) * 0.5
    p = weights * logits.exp()
    expected = (p / p.sum(-1, keepdim=True)) @ v[0, 0].cpu().double()
    torch.testing.assert_close(out[0, 0].cpu().double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Lq", [3, 12])      # the CPU walks each row's keys, or keys
@pytest.mark.parametrize("sel", ["kv", "q"])
def test_positions_listed_twice_count_twice(Lq, sel):
    """A position twice in fixed_tokens, in two regions, or twice in one region is attended
    twice (weight 2), as the reference says: output, lse and gradients, through lse too."""
    B, Hq, Hkv, N, D = 2, 4, 2, 30, 8
    layout = GazeLayout(torch.tensor([0, 6, 12, 15], dtype=torch.int32),
                        torch.tensor([0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 10, 11],
                                     dtype=torch.int32),             # 4, 5 in regions 0 and 1
                        torch.tensor([5, 9, 11], dtype=torch.int32),  # 10 twice in region 2
                        torch.tensor([20, 21, 20, -1, 22, 12], dtype=torch.int32), N)
    gen = generator(31 + Lq)
    idx = random_selection(gen, (B, Hkv if sel == "kv" else Hq, Lq, 3), 3)
    q_pos = q_positions(gen, B, Lq, N, low=20)  # every row sees fixed token 20 (twice)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64)
              for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    grad = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Lq, generator=gen, dtype=torch.float64)
    args = (*layout_args(layout, "cpu"), idx, q_pos)
    counts = reference.key_multiplicity(*layout_args(layout, "cpu"), idx, N, Hq, q_pos)
    assert (counts[..., 20] == 2).all() and (counts[..., [4, 5, 10]] == 2).any()

    def run(attention):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, lse = attention(*leaves, *args)
        torch.autograd.backward([out, lse], [grad, grad_lse])
        return [out.detach(), lse.detach()] + [t.grad for t in leaves]

    for name, got, ref in zip(["out", "lse", "dq", "dk", "dv"], run(ops.gaze_attention),
                              run(reference.gaze_attention)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_float64():
    gen = generator(21)
    B, Hq, Hkv, Lq, N, D = 2, 4, 2, 3, 14, 5
    layout = random_batch_layout(gen, B, N, max_regions=5, max_region_size=4)
    for Hs, causal in ((Hkv, False), (Hq, True)):
        idx = random_selection(gen, (B, Hs, Lq, 3), layout.num_regions)
        q_pos = q_positions(gen, B, Lq, N, low=N // 2) if causal else None
        q = torch.randn(B, Hq, Lq, D, dtype=torch.float64, generator=gen, requires_grad=True)
        k = torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=gen, requires_grad=True)
        v = torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=gen, requires_grad=True)

        def fn(q, k, v):
            out, lse = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                                          layout.fixed_tokens, idx, q_pos, 0.7)
            return out, torch.where(torch.isfinite(lse), lse, 0.0)

        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("Hq, Hkv, Lq, sel, threads", [
    (4, 2, 23, "kv", 7),   # 2 heads on 7 threads: 7 parts of the positions each
    (4, 1, 1, "kv", 2),    # a single row of a single head: both threads on its keys
    (6, 3, 5, "q", 2),     # 3 heads on 2 threads: split to fill the last round
])
def test_cpu_backward_key_parts_match_one_thread(Hq, Hkv, Lq, sel, threads):
    """With fewer (batch, KV head) pairs than threads, the CPU backward deals each head's key
    positions to parts (one writer per dk/dv row) and sums their dq shares: the same
    gradients as one thread, through lse too."""
    gen = generator(77 + Lq)
    B, N, D = 1, 120, 32
    layout = random_batch_layout(gen, B, N, max_regions=10)
    Hs = Hkv if sel == "kv" else Hq
    idx = random_selection(gen, (B, Hs, Lq, 4), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64)
              for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    grad = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Lq, generator=gen, dtype=torch.float64)

    def grads(threads):
        with cpu_threads(threads):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out, lse = ops.gaze_attention(*leaves, *layout_args(layout, "cpu"), idx, q_pos)
            finite = torch.isfinite(lse)
            torch.autograd.backward([out, torch.where(finite, lse, 0.0)],
                                    [grad, torch.where(finite, grad_lse, 0.0)])
            return [t.grad for t in leaves]

    for one, many in zip(grads(1), grads(threads)):
        assert one.abs().sum() > 0
        torch.testing.assert_close(one, many, rtol=1e-12, atol=1e-12)


def assert_float64_walk_matches_reference(inputs, args, threads, grad, grad_lse=None):
    """gaze_attention of the float64 q, k, v `inputs` on `threads` CPU threads against the
    reference: out, lse, and the gradients of q, k, v from `grad` (and `grad_lse` through
    the finite lse) within rounding."""
    def run(attention):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, lse = attention(*leaves, *args)
        outputs, grads = [out], [grad]
        if grad_lse is not None:
            finite = torch.isfinite(lse)
            outputs.append(torch.where(finite, lse, 0.0))
            grads.append(torch.where(finite, grad_lse, 0.0))
        torch.autograd.backward(outputs, grads)
        return [out.detach(), lse.detach()] + [t.grad for t in leaves]

    with cpu_threads(threads):
        got = run(ops.gaze_attention)
    for name, one, ref in zip(["out", "lse", "dq", "dk", "dv"], got, run(reference.gaze_attention)):
        assert ref[ref.isfinite()].abs().sum() > 0, name
        torch.testing.assert_close(one, ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("sel, threads", [("kv", 1), ("q", 1), ("kv", 3), ("q", 2)])
def test_cpu_key_walks_in_row_chunks_match_reference(sel, threads):
    """With many query rows the CPU forward and backward walk keys, a head's rows in chunks:
    here 200 rows at G = 4, D = 256 in float64, in 2-3 chunks by memory (q, dO and dq within
    ~2 MB), or more to fill the threads, and with the backward's key positions dealt to
    parts: the reference's output, lse and gradients (through lse too)."""
    gen = generator(505)
    B, Hq, Hkv, Lq, N, D = 1, 4, 1, 200, 300, 256
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=16)
    idx = random_selection(gen, (B, Hkv if sel == "kv" else Hq, Lq, 6), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N, low=N // 3)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64)
              for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    grad = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Lq, generator=gen, dtype=torch.float64)
    args = (*layout_args(layout, "cpu"), idx, q_pos)
    assert_float64_walk_matches_reference(inputs, args, threads, grad, grad_lse)


@pytest.mark.parametrize("G, sel, threads", [(1, "kv", 1), (2, "kv", 2), (3, "kv", 1),
                                             (3, "q", 2), (4, "q", 1)])
def test_cpu_key_walk_stacks_the_visits_of_few_heads(G, sel, threads):
    """The CPU key walks run the visits of a key block with fewer than 4 heads (G < 4, or a
    query head's own selection) in stacks of up to 8 rows that see the same prefix of the
    block. Few regions, so that many rows take each one; causal limits inside the blocks
    (one prefix per row there, one for all rows after the last key), and a row that sees no
    key: the reference's output, lse and gradients in float64."""
    gen = generator(700 + 10 * G + threads)
    B, Hkv, Lq, N, D = 2, 2, 48, 260, 24
    Hq = G * Hkv
    layout = random_batch_layout(gen, B, N, max_regions=6, max_region_size=40)
    idx = random_selection(gen, (B, Hkv if sel == "kv" else Hq, Lq, 3), layout.num_regions)
    q_pos = torch.where(torch.rand(B, Lq, generator=gen) < 0.5, N,
                        q_positions(gen, B, Lq, N, low=N // 2)).to(torch.int32)
    q_pos[0, 5] = -1
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64)
              for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    grad = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    args = (*layout_args(layout, "cpu"), idx, q_pos)
    assert_float64_walk_matches_reference(inputs, args, threads, grad)


@pytest.mark.parametrize("B, Hq, Hkv, Lq, sel, causal, threads", [
    (1, 4, 1, 1, "kv", False, 2),   # a decode step of one task: both threads on its keys
    (1, 4, 1, 1, "kv", False, 5),
    (1, 6, 2, 1, "q", True, 3),     # per-head selection, causal: 2 tasks, 3 splits each
    (1, 3, 1, 2, "kv", True, 5),    # two rows: 1-2 key blocks for 5 splits, and no key
    (3, 2, 1, 1, "kv", False, 2),   # 3 tasks on 2 threads: split to fill the last round
])
def test_cpu_forward_key_splits_match_reference(B, Hq, Hkv, Lq, sel, causal, threads):
    """With fewer (batch, KV head, row) tasks than threads, or a count that leaves threads
    idle in the last round, the CPU forward splits each task's key blocks and merges the
    splits' softmax states: the reference's output and lse, a different float32 rounding
    from one thread's (so the split path ran), the same float64 result within rounding."""
    gen = generator(90 + threads)
    N, D, K = 6000, 16, 6
    layout = random_batch_layout(gen, B, N, max_regions=40, max_region_size=12)
    idx = random_selection(gen, (B, Hkv if sel == "kv" else Hq, Lq, K), layout.num_regions)
    q_pos = None
    if causal:
        q_pos = q_positions(gen, B, Lq, N, low=N // 4)
        if Lq > 1:
            q_pos[0, 0] = 200  # a row with fewer key blocks than splits
            q_pos[0, -1] = -1  # a row that sees no key: out 0, lse -inf
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64)
              for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    args = (*layout_args(layout, "cpu"), idx, q_pos, 0.4)
    ref_out, ref_lse = reference.gaze_attention(*inputs, *args)

    def forward(threads, dtype):
        with cpu_threads(threads):
            return ops.gaze_attention(*[t.to(dtype) for t in inputs], *args)

    out64, lse64 = forward(threads, torch.float64)
    one_out64, one_lse64 = forward(1, torch.float64)
    torch.testing.assert_close(out64, one_out64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse64, one_lse64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out64, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse64, ref_lse, rtol=1e-10, atol=1e-10)
    out32, lse32 = forward(threads, torch.float32)
    one_out32, _ = forward(1, torch.float32)
    assert not torch.equal(out32, one_out32), "the split path did not run"
    torch.testing.assert_close(out32.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse32.double(), ref_lse, rtol=1e-5, atol=1e-5)
    out16, _ = forward(threads, torch.bfloat16)
    torch.testing.assert_close(out16.double(), ref_out, rtol=2e-2, atol=8e-3)


@pytest.mark.parametrize("share_kv, causal, topk, scale, cached, regions", [
    (True, False, 2, None, False, True),
    (False, True, 3, 0.3, False, True),
    (True, True, None, None, True, True),   # dense over the layout, stale cached descriptors
    (False, True, None, None, False, False),  # no regions at all
], ids=["kv", "q-causal-scale", "dense-cached", "no-regions"])
def test_functional_gaze_attention_composes_the_reference_ops(share_kv, causal, topk, scale,
                                                              cached, regions):
    gen = generator(31)
    B, Hq, Hkv, Lq, N, D = 2, 4, 2, 5, 60, 16
    layout = (random_batch_layout(gen, B, N, max_regions=8) if regions
              else build_layout([], N))
    q, k, v = [torch.randn(s, generator=gen, dtype=torch.float64)
               for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    q_pos = q_positions(gen, B, Lq, N) if causal else None
    pooled_from = torch.randn(k.shape, generator=gen, dtype=torch.float64) if cached else k
    desc = reference.region_pool(pooled_from, layout.region_ptr, layout.region_tokens)
    slots = max(layout.num_regions, 1) if topk is None else topk
    idx, score = reference.region_topk(q, desc, layout.region_ptr, slots, share_kv, q_pos,
                                       layout.region_pos if causal else None)
    out, lse = reference.gaze_attention(q, k, v, *layout_args(layout, "cpu"), idx, q_pos, scale)
    res = gaze_ext.gaze_attention(q, k, v, layout, topk, share_kv=share_kv, q_pos=q_pos,
                                  scale=scale, desc=desc if cached else None,
                                  return_selection=True)
    assert torch.equal(res.idx, idx)
    torch.testing.assert_close(res.score, score)
    torch.testing.assert_close(res.out, out)
    torch.testing.assert_close(res.lse, lse)
    torch.testing.assert_close(gaze_ext.gaze_attention(q, k, v, layout, topk, share_kv=share_kv,
                                                       q_pos=q_pos, scale=scale,
                                                       desc=desc if cached else None), out)
