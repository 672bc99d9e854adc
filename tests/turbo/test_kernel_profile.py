"""turbo/kernel_profile.py on the CPU: operators' self time summed per name, largest first."""

from __future__ import annotations

import torch

from lmcompress.turbo.kernel_profile import MAX_NAME, kernel_table, profiled, short_name, total_device_us


def test_time_is_summed_per_kernel_and_sorted():
    cpu = torch.device("cpu")
    a = torch.randn(256, 256)
    with profiled(cpu) as prof:
        for _ in range(4):
            torch.relu(a @ a)
        torch.sigmoid(a)
    rows = kernel_table(prof, cpu)
    by_name = {row.name: row for row in rows}
    assert by_name["aten::mm"].calls == 4 and by_name["aten::sigmoid"].calls == 1
    assert [row.total_us for row in rows] == sorted((row.total_us for row in rows), reverse=True)
    assert abs(sum(row.share for row in rows) - 1) < 1e-9
    assert abs(total_device_us(rows) - sum(row.calls * row.mean_us for row in rows)) < 1e-6


def test_template_arguments_are_dropped_from_kernel_names():
    name = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, float*)"
    assert short_name(name) == "void at::native::vectorized_elementwise_kernel"
    assert len(short_name("k" * 500)) == MAX_NAME
