"""The benchmarks' report helpers (the benchmarks themselves run outside the tests)."""
from benchmarks.common import kernel_sections, kernel_times, short_kernel_name


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
