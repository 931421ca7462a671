"""Random shapes, layouts and layouts mixing shared and batched tensors, against the
reference; random corruptions of the index contents must raise, never crash."""
import pytest
import torch

from gaze_ext import ops, reference
from gaze_ext.layout import GazeLayout
from helpers import (DEVICES, DTYPES, ZERO_SIZE_CASES, ZERO_SIZE_IDS, atol_for,
                     error_bound_check, generator, high_precision, random_batch_layout,
                     random_layout, random_selection, random_tensor, zero_size_case)


def mixed_layout(gen, B, N):
    """region_ptr shared by the batch, region_tokens and fixed_tokens per sample (each
    sample's positions permuted), region_pos per sample."""
    base = random_layout(gen, N, max_regions=7)
    tokens, fixed, pos = [], [], []
    for _ in range(B):
        perm = torch.cat([torch.randperm(N, generator=gen).int(), torch.tensor([-1]).int()])
        t = perm[base.region_tokens.long()]
        tokens.append(t)
        fixed.append(perm[base.fixed_tokens.long()])  # -1 padding indexes the -1 at perm[N]
        ptr = base.region_ptr.tolist()
        pos.append(torch.tensor([int(t[a:b].max()) if b > a else 0 for a, b in zip(ptr, ptr[1:])],
                                dtype=torch.int32))
    return GazeLayout(base.region_ptr, torch.stack(tokens), torch.stack(pos), torch.stack(fixed), N)


def draw_case(seed):
    gen = generator(50_000 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    B, Hkv, G, Lq, N, D = r(1, 3), r(1, 3), r(1, 4), r(0, 12), r(0, 50), r(1, 70)
    kind = r(0, 2)
    if kind == 0:
        layout = random_batch_layout(gen, B, N, shared=True, max_regions=9)
    elif kind == 1:
        layout = random_batch_layout(gen, B, N, max_regions=9)
    else:
        layout = mixed_layout(gen, B, N)
    return gen, r, (B, Hkv, G, Lq, N, D), layout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(24))
def test_fuzz_against_reference(device, seed):
    gen, r, (B, Hkv, G, Lq, N, D), layout = draw_case(seed)
    dtype = DTYPES[seed % 3]
    Hq = Hkv * G
    strided = [False, True, "last"][r(0, 2)]
    q = random_tensor(gen, (B, Hq, Lq, D), dtype, device, strided).requires_grad_()
    k = random_tensor(gen, (B, Hkv, N, D), dtype, device, strided).requires_grad_()
    v = random_tensor(gen, (B, Hkv, N, D), dtype, device, strided).requires_grad_()
    dev_layout = layout.to(device)

    desc = ops.region_pool(k, dev_layout.region_ptr, dev_layout.region_tokens)
    desc_ref = reference.region_pool(k.detach().cpu(), layout.region_ptr, layout.region_tokens)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(desc.detach().cpu().float(), desc_ref.float(), atol=tol, rtol=tol)

    share_kv = bool(r(0, 1))
    causal = bool(r(0, 1))
    q_pos = torch.randint(-1, N + 1, (B, Lq), generator=gen, dtype=torch.int32) if causal else None
    topk = r(1, layout.num_regions + 2)
    idx, score = ops.region_topk(q.detach(), desc.detach(), dev_layout.region_ptr, topk, share_kv,
                                 None if q_pos is None else q_pos.to(device),
                                 dev_layout.region_pos if causal else None)
    ref_all = reference.region_scores(q.detach().cpu(), desc.detach().cpu(), share_kv)
    picked = ref_all.gather(-1, idx.cpu().clamp(min=0).long()) if ref_all.shape[-1] else score.cpu()
    torch.testing.assert_close(torch.where(idx.cpu() >= 0, picked, float("-inf")), score.cpu(),
                               atol=1e-3, rtol=1e-3)
    ok = reference.selectable_regions(layout.region_ptr, B, Lq, q_pos, layout.region_pos)
    n_ok = ok.sum(-1).expand(idx.shape[:-1])
    assert torch.equal((idx.cpu() >= 0).sum(-1), n_ok.clamp(max=topk))

    # attention with a random (not top-k) selection, so -1 slots and repeats occur too
    idx = random_selection(gen, (B, [Hkv, Hq][r(0, 1)], Lq, r(0, 5)), layout.num_regions)
    out, lse = ops.gaze_attention(q, k, v, dev_layout.region_ptr, dev_layout.region_tokens,
                                  dev_layout.fixed_tokens, idx.to(device),
                                  None if q_pos is None else q_pos.to(device), 0.4)
    hp = high_precision(dtype)
    leaves = [t.detach().cpu().to(hp).requires_grad_() for t in (q, k, v)]
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.4)
    same_leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.gaze_attention(*leaves, *args)
    same_out, _ = reference.gaze_attention(*same_leaves, *args, compute_dtype=dtype)
    error_bound_check("out", out.detach().cpu(), ref_out.detach(), same_out.detach(), 2.0,
                      atol_for(dtype))
    torch.testing.assert_close(lse.detach().cpu(), ref_lse.detach().float(), atol=2e-3, rtol=1e-4)

    grad = torch.randn(B, Hq, Lq, D, generator=gen)
    (out.float() * grad.to(device)).sum().backward()
    (ref_out * grad.to(hp)).sum().backward()
    (same_out.float() * grad).sum().backward()
    for name, got, ref, same in zip("qkv", (q, k, v), leaves, same_leaves):
        error_bound_check(f"d{name}", got.grad.cpu(), ref.grad, same.grad, 3.0, atol_for(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, Lq, N, D, regions", ZERO_SIZE_CASES, ids=ZERO_SIZE_IDS)
def test_zero_size_operands(device, B, Lq, N, D, regions):
    """Every op, forward and backward, with one axis empty (the default scale too, which
    D = 0 would make 0 ** -0.5): the reference's shapes and values."""
    layout, qkv = zero_size_case(B, Lq, N, D, regions)
    dev_layout = layout.to(device)
    q, k, v = (t.to(device).requires_grad_() for t in qkv)
    desc = ops.region_pool(k, dev_layout.region_ptr, dev_layout.region_tokens)
    idx, _ = ops.region_topk(q, desc, dev_layout.region_ptr, 2, True)
    assert desc.shape == (B, 2, layout.num_regions, D) and idx.shape == (B, 2, Lq, 2)
    out, lse = ops.gaze_attention(q, k, v, dev_layout.region_ptr, dev_layout.region_tokens,
                                  dev_layout.fixed_tokens, idx)
    (out.sum() + desc.sum() + torch.where(lse.isfinite(), lse, 0).sum()).backward()
    leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    ref_desc = reference.region_pool(leaves[1], layout.region_ptr, layout.region_tokens)
    ref_out, ref_lse = reference.gaze_attention(*leaves, layout.region_ptr, layout.region_tokens,
                                                layout.fixed_tokens, idx.cpu())
    (ref_out.sum() + ref_desc.sum() + torch.where(ref_lse.isfinite(), ref_lse, 0).sum()).backward()
    for got, want in ((out, ref_out), (lse, ref_lse), *zip((q, k, v), leaves)):
        got, want = (got.grad, want.grad) if got.is_leaf else (got, want)
        assert got.shape == want.shape
        torch.testing.assert_close(got.detach().cpu(), want.detach(), atol=1e-5, rtol=1e-5)


CORRUPTIONS = ["token_high", "token_negative", "ptr_decrease", "ptr_past", "fixed_high",
               "idx_high", "idx_low"]


@pytest.mark.parametrize("seed", range(14))
def test_fuzz_corrupted_indices_raise(seed):
    gen, r, (B, Hkv, G, Lq, N, D), layout = draw_case(seed)
    N = max(N, 1)
    layout = random_batch_layout(gen, B, N, max_regions=6, empty_regions=False)
    q, k, v = (torch.randn(B, Hkv * G, max(Lq, 1), D), torch.randn(B, Hkv, N, D),
               torch.randn(B, Hkv, N, D))
    ptr, tokens, fixed = (layout.region_ptr.clone(), layout.region_tokens.clone(),
                          layout.fixed_tokens.clone())
    idx = random_selection(gen, (B, Hkv, q.shape[2], 2), layout.num_regions)
    what = CORRUPTIONS[seed % len(CORRUPTIONS)]
    b = r(0, B - 1)
    R = layout.num_regions
    if what.startswith("token") and ptr[b, -1] == 0 or what.startswith("ptr") and R == 0:
        pytest.skip("nothing to corrupt in this draw")
    if what == "token_high":
        tokens[b, r(0, int(ptr[b, -1]) - 1)] = N + r(0, 5)
    elif what == "token_negative":
        tokens[b, r(0, int(ptr[b, -1]) - 1)] = -r(1, 5)
    elif what == "ptr_decrease":
        j = r(1, R)
        ptr[b, j] = ptr[b, j - 1] - 1
    elif what == "ptr_past":
        ptr[b, -1] = tokens.shape[1] + 1
    elif what == "fixed_high":
        fixed = torch.cat([fixed, torch.full((B, 1), N, dtype=torch.int32)], 1)
    elif what == "idx_high":
        idx[b, 0, 0, 0] = R + r(0, 3)
    else:
        idx[b, 0, 0, 0] = -2 - r(0, 3)
    with pytest.raises(RuntimeError):
        ops.gaze_attention(q, k, v, ptr, tokens, fixed, idx)
    if what.startswith(("token", "ptr")):
        with pytest.raises(RuntimeError):
            ops.region_pool(k, ptr, tokens)
