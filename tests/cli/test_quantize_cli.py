"""`lmc quantize`'s method options: each flag reaches its method, and lmc_quantize.json records them."""

from __future__ import annotations

import inspect
import json

import pytest
from click.testing import CliRunner

from lmcompress import reference
from lmcompress.cli import quantize as quantize_cli
from lmcompress.cli.main import cli
from lmcompress.pipeline import QuantizeSummary
from lmcompress.pipeline_io import PROVENANCE_FILE
from lmcompress.quant.methods import method_named
from lmcompress.reference.random_checkpoint import make_random_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AWQ_DEFAULTS = {"clip": True, "duo_scaling": True, "gqa_scaling": True}  # range_search: the method's own default
GPTQ_DEFAULTS = {"act_order": False, "damp_percent": 0.01}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--method", "awq"], AWQ_DEFAULTS),
        (["--method", "awq", "--no-gqa-scaling"], AWQ_DEFAULTS | {"gqa_scaling": False}),
        (["--method", "awq", "--range-search"], AWQ_DEFAULTS | {"range_search": True}),
        (["--method", "gptq"], GPTQ_DEFAULTS),
        (["--method", "gptq", "--no-range-search"], GPTQ_DEFAULTS | {"range_search": False}),
        (["--method", "rtn", "--no-range-search"], {}),
    ],
)
def test_flags_become_the_methods_keyword_options(monkeypatch, tmp_path, flags, expected):
    seen = {}

    def recording_quantize(src, out, options, overwrite=False):
        seen["options"] = options
        return QuantizeSummary(str(out), 1.0, 0, "rss", 1, 1)

    monkeypatch.setattr(quantize_cli, "quantize_checkpoint", recording_quantize)
    outcome = CliRunner().invoke(cli, ["quantize", "SRC", str(tmp_path / "out"), *flags])
    assert outcome.exit_code == 0, outcome.output
    options = seen["options"]
    assert options.method_options == expected
    # the pipeline calls method(ctx, **method_options): every key must be a parameter of the method
    inspect.signature(method_named(options.method)).bind("ctx", **options.method_options)


def test_provenance_records_the_method_options(tmp_path):
    src = make_random_checkpoint(tmp_path / "src", "llama", hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "out"
    outcome = CliRunner().invoke(cli, [
        "quantize", str(src), str(out), "--method", "awq", "--no-gqa-scaling", "--range-search", "--no-clip",
        "--device", "cpu", "--calib-data", str(reference.REFERENCE_CALIB), "--calib-samples", "2",
        "--calib-seqlen", "64",
    ])
    assert outcome.exit_code == 0, outcome.output
    recorded = json.loads((out / PROVENANCE_FILE).read_text())["method_options"]
    assert recorded == {"clip": False, "duo_scaling": True, "gqa_scaling": False, "range_search": True}
