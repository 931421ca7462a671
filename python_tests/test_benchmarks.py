"""The benchmarks' report helpers, and each benchmark end to end on a tiny CPU shape (the
timings are meaningless there: what is checked is that the GPU check's benchmark steps
run and report every figure and verdict)."""
import json

import pytest
import torch

import benchmarks.common
import gaze_ext
from benchmarks import decode, flex, prefill, profile_case
from benchmarks.common import kernel_sections, kernel_times, short_kernel_name
from gaze_ext import reference
from helpers import generator, q_positions, random_layout, random_selection


def peer_agrees(fact) -> bool:
    """The FlexAttention peer saw what gaze_attention sees: its compiled output agrees, or,
    where torch's compiled kernel went wrong, eager flex_attention with the same mask does."""
    return fact.get("eager_max_abs_diff", fact["max_abs_diff"]) < 1e-5


@pytest.fixture
def quick_timing(monkeypatch):
    fast = benchmarks.common.time_variants

    def time_once(variants, device, **_):
        return fast(variants, device, rounds=1, min_time_s=0.0, warmup=1)

    for module in (benchmarks.common, decode, prefill):
        monkeypatch.setattr(module, "time_variants", time_once)
    monkeypatch.setattr(decode, "memory_bandwidth",
                        lambda device: benchmarks.common.memory_bandwidth(device, 1 << 20))


def test_decode_benchmark_runs_and_reports(quick_timing, monkeypatch, tmp_path):
    monkeypatch.setattr(decode, "CPU_SHAPE", decode.DecodeShape(1, 4, 2, 16, 2, 7, 5, 9, (1, 3, 3),
                                                                0.25, "float32"))
    # the CUDA run's rows for the kernels the plans replaced (the CPU ignores their variables)
    monkeypatch.setitem(decode.ALTERNATIVES, "cpu", True)
    assert decode.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "decode-cpu.json").read_text())
    text = (tmp_path / "decode-cpu.md").read_text()
    assert {row["variant"] for row in result["rows"]} >= {"sdpa_gqa", "gaze_shared", "attention_per_head"}
    assert set(result["verdicts"]) == {"shared", "per_head"} and result["bandwidth_share"] > 0
    assert "shared selection: region_topk + gaze_attention is" in text
    assert "of the read bandwidth measured above (no target on this device)" in text
    assert [row["dtype"] for row in result["other_dtypes"]] == ["bfloat16", "float16"]
    # a tiny step cannot leave the cache: the most copies, and the report says so
    assert result["cache"]["copies"] == decode.MAX_CACHE_COPIES
    assert f"KV caches: {decode.MAX_CACHE_COPIES} copies" in text and "(under 2x:" in text
    variants = {row["variant"] for row in result["rows"]}
    for mode in ("shared", "per_head"):  # FlexAttention computed the same attention
        assert {f"flex_{mode}", f"flex_mask_{mode}"} <= variants
        assert peer_agrees(result["flex"][mode])
        assert 0 < result["flex"][mode]["computed_share"] <= 1
    assert "- FlexAttention, shared selection (`flex_shared`;" in text
    assert "attention_shared_padded_fixed" in variants
    assert "- `gather_rows_shared` (torch.index_select of the shared step's distinct" in text
    assert result["padded_fixed"]["valid"] < result["padded_fixed"]["entries"] == result["keys"]
    assert "padded with -1 to the cache's length" in text
    assert {"attention_shared_block", "topk_per_head_one_block"} <= variants
    assert "- `attention_shared_block`: the block-synchronous split-K forward" in text
    assert "- `topk_per_head_one_block`: region_topk with one block per row" in text
    assert result["split_sweep"] == []  # GAZE_SPLITS is for the CUDA kernels
    one = result["one_kv_head"]
    assert one["q_heads"] == 2 and one["threads"] == torch.get_num_threads()
    assert one["attention_ms"] > 0 and one["attention_one_thread_ms"] > 0
    assert f"One KV head (B=1, Hq=2, Hkv=1, the same cache; {one['copies']} copies)" in text
    result.update(bandwidth_target=0.7, floor_bandwidth="copy")  # as a CUDA run reports it
    result["verdicts"]["attention_bandwidth"] = "MISS"
    result["split_sweep"] = [dict(splits=1, us=80.0), dict(splits=8, us=41.5)]
    text = decode.report(result)
    assert "of the copy bandwidth measured above (target 70%): **MISS**" in text
    assert "instead of the plan's: 1: 80.0 us, 8: 41.5 us (the plan: " in text


def test_decode_cache_copies_leave_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(decode, "last_level_cache_bytes", lambda device: 16 << 20)
    # 3 other copies x 12 MB moved between two steps on one: at least twice the 16 MB cache
    assert decode.copies_needed(12 << 20, "cpu") == 4
    assert decode.copies_needed(64 << 20, "cpu") == 2
    assert decode.copies_needed(1, "cpu") == decode.MAX_CACHE_COPIES
    seen = []
    step = decode.rotating(["a", "b", "c"], seen.append)
    for _ in range(7):
        step()
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]


def test_shared_step_rows_are_the_distinct_rows_counted():
    torch.manual_seed(0)
    B, Hkv, N, D = 2, 3, 61, 4
    layout = gaze_ext.build_layout([(0, 2, 5, 6)], N, region_shape=(1, 2, 4))
    q = torch.randn(B, Hkv, 1, D)
    desc = torch.randn(B, Hkv, layout.num_regions, D)
    idx, _ = gaze_ext.ops.region_topk(q, desc, layout.region_ptr, 3, True)
    idx[0, 1, 0, 2] = -1  # an empty slot
    rows = decode.shared_step_rows(layout, decode.padded_regions(layout), idx, N)
    counts = decode.row_counts(layout, idx, True, 1)
    assert rows.numel() == counts["distinct"] * B * Hkv
    assert len(set(rows.tolist())) == rows.numel()  # no row twice
    ptr, tokens = layout.region_ptr.tolist(), layout.region_tokens.tolist()
    for b in range(B):
        for h in range(Hkv):
            expect = set(layout.fixed_tokens.tolist())
            for r in idx[b, h, 0].tolist():
                if r >= 0:
                    expect |= set(tokens[ptr[r]:ptr[r + 1]])
            head = (b * Hkv + h) * N
            assert {x - head for x in rows.tolist() if head <= x < head + N} == expect


def test_prefill_benchmark_runs_and_reports(quick_timing, monkeypatch, tmp_path):
    monkeypatch.setattr(prefill, "CPU_SHAPE", prefill.PrefillShape(1, 4, 2, 16, 2, 6, 7, 20, 0.25,
                                                                   "float32"))
    assert prefill.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "prefill-cpu.json").read_text())
    text = (tmp_path / "prefill-cpu.md").read_text()
    assert result["verdicts"] == {"iid": "n/a", "correlated": "n/a"}
    assert 0 < result["union_fraction"]["iid"] <= 1
    assert "forward+backward, shared selection, iid queries:" in text
    assert "flex_shared_fwd" in {row["variant"] for row in result["rows"]}
    topk_row = next(row for row in result["rows"] if row["variant"] == "topk_shared")
    assert "speedup" not in topk_row  # the selection alone has no dense peer
    flops = {row["variant"]: row.get("TFLOP/s") for row in result["rows"]}
    assert flops["gaze_shared_fwd"] > 0 and flops["gaze_shared_fwd_correlated"] > 0
    assert peer_agrees(result["flex"])  # forward only: no backward on the CPU
    assert prefill.main(["--device", "cpu", "--out", str(tmp_path), "--no-flex"]) == 0
    result = json.loads((tmp_path / "prefill-cpu.json").read_text())
    assert not any(row["variant"].startswith("flex") for row in result["rows"])
    assert "- FlexAttention peer: left out (--no-flex)" in (tmp_path / "prefill-cpu.md").read_text()


def test_profile_case_runs_each_step(monkeypatch):
    """gpu_check.sh's `profile` mode runs profile_case under Nsight Compute: its decode and
    prefill steps, here at tiny shapes on the CPU, call the ops they are meant to profile."""
    monkeypatch.setattr(decode, "GPU_SHAPE", decode.DecodeShape(2, 4, 2, 16, 2, 7, 5, 9, (1, 3, 3),
                                                                 0.3, "bfloat16"))
    monkeypatch.setattr(prefill, "GPU_SHAPE", prefill.PrefillShape(1, 4, 2, 16, 2, 6, 7, 20, 0.25,
                                                                   "bfloat16"))
    calls = []
    for name in ("region_topk", "gaze_attention"):
        op = getattr(profile_case.ops, name)
        monkeypatch.setattr(profile_case.ops, name,
                            lambda *a, op=op, name=name, **kw: calls.append(name) or op(*a, **kw))
    profile_case.main(["decode", "--device", "cpu", "--repeats", "3"])
    assert calls == ["region_topk", "gaze_attention"] * 6  # 3 shared, then 3 per query head
    calls.clear()
    profile_case.main(["prefill", "--device", "cpu"])
    assert calls == ["region_topk", "gaze_attention"] * 2
    leaves = profile_case.prefill_steps(1, "cpu")  # the backward ran too
    assert all(t.grad is not None and t.grad.isfinite().all() for t in leaves)


@pytest.mark.parametrize("seed", range(6))
def test_flex_mask_sees_what_gaze_attention_sees(seed):
    """The peer's mask_mod against the reference's key multiplicities, on hand-made-style
    layouts (random regions, fixed tokens, keys in no list), -1 slots and causal limits,
    for a selection per KV head and one per query head."""
    gen = generator(seed)
    B, Hkv, G, Lq, K, N = 2, 2, 3, 5, 3, 40
    layout = random_layout(gen, N)
    R = layout.num_regions
    for Hs in (Hkv, Hkv * G):
        idx = random_selection(gen, (B, Hs, Lq, K), R, repeats=False)
        q_pos = q_positions(gen, B, Lq, N) if Hs == Hkv else None
        mask_mod = flex.selection_mask_mod(flex.key_maps(layout, N, "cpu"), idx, q_pos, Hkv * G)
        b, h, i, n = (torch.arange(size).view([-1 if d == a else 1 for d in range(4)])
                      for a, size in enumerate((B, Hkv * G, Lq, N)))
        expected = reference.key_multiplicity(layout.region_ptr, layout.region_tokens,
                                              layout.fixed_tokens, idx, N, Hkv * G, q_pos) > 0
        assert torch.equal(mask_mod(b, h, i, n).expand(B, Hkv * G, Lq, N), expected)


@pytest.mark.parametrize("q_len,causal", [(1, False), (3, True), (130, True)])
def test_flex_block_share_counts_the_blocks_with_a_visible_key(q_len, causal):
    """computed_share against a count of the 128 x 128 blocks in which mask_mod sees a key,
    with lengths that are not multiples of the block size (2 x 2 x 6 x 7 visual keys + text)."""
    gen = generator(q_len)
    B, Hkv, G, N = 1, 2, 2, 2 * 6 * 7 * 2 + 100
    layout = gaze_ext.build_layout([(0, 2, 6, 7), (100 + 84, 2, 6, 7)], N, region_shape=(1, 2, 2))
    idx = random_selection(gen, (B, Hkv, q_len, 3), layout.num_regions, repeats=False)
    q_pos = q_positions(gen, B, q_len, N, low=N // 2) if causal else None
    maps = flex.key_maps(layout, N, "cpu")
    mask = flex.selection_block_mask(maps, idx, q_pos, Hkv * G, q_len)
    mask_mod = flex.selection_mask_mod(maps, idx, q_pos, Hkv * G)
    sees = mask_mod(*(torch.arange(size).view([-1 if d == a else 1 for d in range(4)])
                      for a, size in enumerate((B, Hkv * G, q_len, N)))).expand(B, -1, q_len, N)
    blocks = [[sees[..., i:i + 128, n:n + 128].flatten(-2).any(-1)
               for n in range(0, N, 128)] for i in range(0, q_len, 128)]
    expected = torch.stack([torch.stack(row, -1) for row in blocks], -2).double().mean().item()
    assert abs(flex.computed_share(mask, N) - expected) < 1e-12


def test_flex_mask_refuses_keys_in_two_regions():
    layout = gaze_ext.GazeLayout(torch.tensor([0, 2, 4], dtype=torch.int32),
                                 torch.tensor([0, 1, 1, 2], dtype=torch.int32),
                                 torch.tensor([1, 2], dtype=torch.int32),
                                 torch.tensor([3], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="listed twice"):
        flex.key_maps(layout, 4, "cpu")


def test_kernel_names_lose_namespaces_and_parameters():
    assert short_kernel_name(
        "void gaze::cuda::(anonymous namespace)::attention_forward_kernel<__nv_bfloat16, true, 4>"
        "(gaze::cuda::AttnParams)") == "attention_forward_kernel<__nv_bfloat16, true, 4>"
    assert short_kernel_name(
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >"
        "(int, at::native::FillFunctor<float>)"
    ) == "vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >"
    assert short_kernel_name("Memset (Device)") == "Memset"
    assert short_kernel_name("flash_fwd_kernel") == "flash_fwd_kernel"
    long_name = short_kernel_name("void f<" + "int, " * 40 + "int>(int)")
    assert len(long_name) == 80 and long_name.startswith("f<int, ") and long_name.endswith("...")


def test_kernel_tables_only_for_cuda_runs():
    assert kernel_times(lambda: None, "cpu") == []
    assert kernel_sections({"step": []}) == []
    rows = [dict(kernel="k<1>", us_per_call=12.5, launches_per_call=1.0)]
    lines = kernel_sections({"step": rows})
    assert "| k<1> | 12.5 | 1 |" in lines[-1] and "`step`" in lines[1]


def tiny_block_mask():
    """A block mask over one 4x4 region of 20 keys, for one query (what facts() is given)."""
    layout = gaze_ext.build_layout([(0, 1, 4, 4)], 20)
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    return flex.selection_block_mask(flex.key_maps(layout, 20, "cpu"), idx, None, 1, 1)


def test_flex_facts_check_the_mask_eagerly_only_when_the_compiled_output_disagrees():
    mask = tiny_block_mask()
    gaze_out = torch.rand(1, 1, 1, 8) * 0.5
    eager_calls = []

    def eager():
        eager_calls.append(1)
        return gaze_out + 2 ** -23  # exact in float32 where |out| < 1

    agreeing = flex.facts(mask, 20, gaze_out + 1e-6, gaze_out, eager)
    assert not eager_calls and "eager_max_abs_diff" not in agreeing and peer_agrees(agreeing)
    for wrong in (gaze_out + 1.0, torch.full_like(gaze_out, float("nan"))):
        fact = flex.facts(mask, 20, wrong, gaze_out, eager)
        assert fact["eager_max_abs_diff"] < 1e-6 and peer_agrees(fact)
        line = flex.report_lines({"x": fact})[0]
        assert "eager flex_attention with the same mask: 1.2e-07" in line
    assert len(eager_calls) == 2
    fact = flex.facts(mask, 20, gaze_out + 1.0, gaze_out, lambda: gaze_out + 1.0)
    assert not peer_agrees(fact)  # a wrong mask shows in both outputs


def test_flex_facts_report_an_eager_check_that_could_not_run():
    mask = tiny_block_mask()

    def out_of_memory():
        raise RuntimeError("out of memory")

    gaze_out = torch.zeros(1, 1, 1, 8)
    fact = flex.facts(mask, 20, gaze_out + 1.0, gaze_out, out_of_memory)
    assert fact["eager_error"] == "RuntimeError: out of memory" and not peer_agrees(fact)
    assert "could not run: RuntimeError: out of memory" in flex.report_lines({"x": fact})[0]
