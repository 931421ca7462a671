"""Every invalid input of DESIGN.md raises a RuntimeError that names the argument."""
import pytest
import torch

from gaze_ext import build_layout, ops

B, Hq, Hkv, Lq, N, D = 2, 4, 2, 3, 40, 8
LAYOUT = build_layout([(2, 1, 5, 6)], N, region_shape=(1, 3, 3))
R = LAYOUT.num_regions
I32 = torch.int32


def base_args():
    return dict(
        q=torch.randn(B, Hq, Lq, D), k=torch.randn(B, Hkv, N, D), v=torch.randn(B, Hkv, N, D),
        region_ptr=LAYOUT.region_ptr.clone(), region_tokens=LAYOUT.region_tokens.clone(),
        fixed_tokens=LAYOUT.fixed_tokens.clone(),
        idx=torch.zeros(B, Hkv, Lq, 2, dtype=I32), q_pos=None, scale=0.5)


def call_attention(a):
    return ops.gaze_attention(**a)


def call_topk(a, k=2, share_kv=True, region_pos=None):
    desc = a.pop("desc", torch.randn(B, Hkv, R, D))
    return ops.region_topk(a["q"], desc, a["region_ptr"], k, share_kv, a["q_pos"], region_pos)


def call_pool(a):
    return ops.region_pool(a["k"], a["region_ptr"], a["region_tokens"])


def expect(fn, a, *words):
    with pytest.raises(RuntimeError) as info:
        fn(a)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


ATTENTION_CASES = {
    "q rank": (dict(q=torch.randn(B, Hq, D)), ["q", "4-D"]),
    "q dtype": (dict(q=torch.randn(B, Hq, Lq, D).int()), ["q", "float32"]),
    "k dtype differs": (dict(k=torch.randn(B, Hkv, N, D).half()), ["k", "dtype"]),
    "v shape": (dict(v=torch.randn(B, Hkv, N + 1, D)), ["k and v"]),
    "batch": (dict(k=torch.randn(B + 1, Hkv, N, D), v=torch.randn(B + 1, Hkv, N, D)),
              ["batch"]),
    "head dim": (dict(k=torch.randn(B, Hkv, N, D + 1), v=torch.randn(B, Hkv, N, D + 1)),
                 ["head dim"]),
    "no kv heads": (dict(k=torch.randn(B, 0, N, D), v=torch.randn(B, 0, N, D)),
                    ["k", "at least one head"]),
    "heads": (dict(k=torch.randn(B, 3, N, D), v=torch.randn(B, 3, N, D),
                   idx=torch.zeros(B, 3, Lq, 2, dtype=I32)), ["multiple"]),
    "idx dtype": (dict(idx=torch.zeros(B, Hkv, Lq, 2, dtype=torch.int64)), ["idx", "int32"]),
    "idx shape": (dict(idx=torch.zeros(B, 3, Lq, 2, dtype=I32)), ["idx", "shape"]),
    "idx rank": (dict(idx=torch.zeros(B, Hkv, Lq, dtype=I32)), ["idx", "4-D"]),
    "idx out of range": (dict(idx=torch.full((B, Hkv, Lq, 2), R, dtype=I32)), ["idx", str(R)]),
    "idx below -1": (dict(idx=torch.full((B, Hkv, Lq, 2), -2, dtype=I32)), ["idx", "-2"]),
    "ptr dtype": (dict(region_ptr=LAYOUT.region_ptr.long()), ["region_ptr", "int32"]),
    "ptr rank": (dict(region_ptr=LAYOUT.region_ptr.view(1, 1, -1)), ["region_ptr", "1-D"]),
    "ptr batch": (dict(region_ptr=LAYOUT.region_ptr.expand(3, -1)), ["region_ptr", "batch"]),
    "ptr empty": (dict(region_ptr=torch.zeros(0, dtype=I32)), ["region_ptr", "R+1"]),
    "ptr start": (dict(region_ptr=LAYOUT.region_ptr + 1), ["region_ptr", "must be 0"]),
    "ptr decreasing": (dict(region_ptr=torch.tensor([0, 9, 5, 12, 30], dtype=I32)),
                       ["region_ptr", "decreases"]),
    "ptr past tokens": (dict(region_tokens=LAYOUT.region_tokens[:-1]), ["region_ptr", "runs past"]),
    "token out of range": (dict(region_tokens=LAYOUT.region_tokens + N),
                           ["region_tokens", "outside"]),
    "last token is N": (dict(region_tokens=torch.cat([LAYOUT.region_tokens[:-1],
                                                      torch.tensor([N], dtype=I32)])),
                         ["region_tokens", "outside"]),
    "token out of range in batch 1": (
        dict(region_tokens=torch.stack([LAYOUT.region_tokens, LAYOUT.region_tokens + N])),
        ["region_tokens[1,", "outside"]),
    "negative token": (dict(region_tokens=LAYOUT.region_tokens - 100),
                       ["region_tokens", "outside"]),
    "fixed out of range": (dict(fixed_tokens=torch.tensor([0, N], dtype=I32)),
                           ["fixed_tokens", "outside"]),
    "fixed below -1": (dict(fixed_tokens=torch.tensor([-2], dtype=I32)),
                       ["fixed_tokens", "outside"]),
    "fixed dtype": (dict(fixed_tokens=torch.tensor([0.0])), ["fixed_tokens", "int32"]),
    # (stride-0 views: no memory behind these lengths)
    "key lists past int32": (dict(fixed_tokens=torch.full((1,), -1, dtype=I32).expand(2**30),
                                  region_tokens=torch.zeros(1, dtype=I32).expand(2**30)),
                             ["fixed_tokens and region_tokens", str(2**31), "int32"]),
    "q_pos shape": (dict(q_pos=torch.zeros(B, Lq + 1, dtype=I32)), ["q_pos", "shape"]),
    "q_pos batch": (dict(q_pos=torch.zeros(B + 1, Lq, dtype=I32)), ["q_pos", "shape"]),
    "q_pos dtype": (dict(q_pos=torch.zeros(B, Lq, dtype=torch.int64)), ["q_pos", "int32"]),
    "scale": (dict(scale=float("nan")), ["scale"]),
    "scale inf": (dict(scale=float("inf")), ["scale"]),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_gaze_attention_rejects(case):
    change, words = ATTENTION_CASES[case]
    a = base_args()
    a.update(change)
    expect(call_attention, a, "gaze.gaze_attention", *words)


TOPK_CASES = {
    "k < 1": (dict(k=0), ["k must be >= 1"]),
    "q rank": (dict(q=torch.randn(Lq, D)), ["q", "4-D"]),
    "desc dtype": (dict(desc=torch.randn(B, Hkv, R, D).double()), ["desc", "dtype"]),
    "desc batch": (dict(desc=torch.randn(B + 1, Hkv, R, D)), ["desc", "batch"]),
    "desc regions": (dict(desc=torch.randn(B, Hkv, R + 1, D)), ["desc", "regions"]),
    "desc heads": (dict(desc=torch.randn(B, 3, R, D)), ["multiple"]),
    "desc head dim": (dict(desc=torch.randn(B, Hkv, R, D + 2)), ["head dim"]),
    "q_pos without region_pos": (dict(q_pos=torch.zeros(B, Lq, dtype=I32)), ["region_pos"]),
    "region_pos size": (dict(q_pos=torch.zeros(B, Lq, dtype=I32),
                             region_pos=torch.zeros(R + 1, dtype=I32)), ["region_pos"]),
    "ptr decreasing": (dict(region_ptr=torch.tensor([0, 3, 2] + [2] * (R - 2), dtype=I32)),
                       ["region_ptr", "decreases"]),
}


@pytest.mark.parametrize("case", TOPK_CASES)
def test_region_topk_rejects(case):
    change, words = TOPK_CASES[case]
    a = base_args()
    extra = {key: change.pop(key) for key in ("k", "region_pos") if key in change}
    a.update(change)
    expect(lambda a: call_topk(a, **extra), a, "gaze.region_topk", *words)


POOL_CASES = {
    "keys rank": (dict(k=torch.randn(N, D)), ["keys", "4-D"]),
    "keys dtype": (dict(k=torch.randn(B, Hkv, N, D).int()), ["keys", "float32"]),
    "token out of range": (dict(region_tokens=LAYOUT.region_tokens + N), ["region_tokens"]),
    "ptr past tokens": (dict(region_tokens=LAYOUT.region_tokens[:3]), ["region_ptr", "runs past"]),
    "N past int32": (dict(k=torch.empty(1, 1, 2**31, 0), region_ptr=torch.tensor([0, 1], dtype=I32),
                          region_tokens=torch.tensor([2**31 - 1], dtype=I32)),
                     ["N (keys.size(2))", "int32"]),
    "tokens past int32": (dict(region_tokens=torch.zeros(1, dtype=I32).expand(2**31 - 200)),
                          ["region_tokens", str(2**31 - 200), "int32"]),
    "tokens batch": (dict(region_tokens=LAYOUT.region_tokens.expand(5, -1)),
                     ["region_tokens", "batch"]),
}


@pytest.mark.parametrize("case", POOL_CASES)
def test_region_pool_rejects(case):
    change, words = POOL_CASES[case]
    a = base_args()
    a.update(change)
    expect(call_pool, a, "gaze.region_pool", *words)


def test_backward_rejects_mismatched_saved_tensors():
    a = base_args()
    out, lse = ops.gaze_attention(**a)
    args = [out, None, a["q"], a["k"], a["v"], out, lse, a["region_ptr"], a["region_tokens"],
            a["fixed_tokens"], a["idx"], None, 0.5]
    bad_lse = list(args)
    bad_lse[6] = lse.double()
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.gaze.gaze_attention_backward(*bad_lse)
    bad_grad = list(args)
    bad_grad[0] = out[:, :, :1]
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.gaze.gaze_attention_backward(*bad_grad)
    with pytest.raises(RuntimeError, match="num_keys"):
        torch.ops.gaze.region_pool_backward(torch.randn(B, Hkv, R, D), a["region_ptr"],
                                            a["region_tokens"], -1)


def test_backward_checks_every_saved_tensor_shape():
    a = base_args()
    out, lse = ops.gaze_attention(**a)
    args = [out, None, a["q"], a["k"], a["v"], out, lse, a["region_ptr"], a["region_tokens"],
            a["fixed_tokens"], a["idx"], None, 0.5]
    for i, name, bad in ((0, "grad_out", out[..., :1]),           # only the head dim differs
                         (5, "out", out[:, :1]),                   # only the heads differ
                         (6, "lse", lse.reshape(B * Hq, Lq)),      # same numel, other shape
                         (1, "grad_lse", lse.double()),
                         (1, "grad_lse", lse[:, :, :1])):
        bad_args = list(args)
        bad_args[i] = bad
        with pytest.raises(RuntimeError, match=f"gaze_attention_backward: {name} must"):
            torch.ops.gaze.gaze_attention_backward(*bad_args)
    with pytest.raises(RuntimeError, match="grad_desc has 5 regions"):
        torch.ops.gaze.region_pool_backward(torch.randn(B, Hkv, R + 1, D), a["region_ptr"],
                                            a["region_tokens"], N)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch_is_named():
    a = base_args()
    a["q"] = a["q"].cuda()
    expect(call_attention, a, "gaze.gaze_attention", "k", "cuda")
    b = base_args()  # idx is checked before the layout: it goes to the GPU too
    b.update(q=b["q"].cuda(), k=b["k"].cuda(), v=b["v"].cuda(), idx=b["idx"].cuda())
    expect(call_attention, b, "region_ptr", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_float64_rejected_on_cuda():
    a = base_args()
    a.update(q=a["q"].double().cuda(), k=a["k"].double().cuda(), v=a["v"].double().cuda())
    expect(call_attention, a, "float64 on CPU")
