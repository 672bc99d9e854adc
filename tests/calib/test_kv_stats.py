import json

import pytest
import torch

from lmcompress.calib.kv_stats import INT4_RANGE_MARGIN, KV_SCALES_FILE, KVRangeRecorder, load_kv_scales
from lmcompress.errors import LmcError

LAYERS, HEADS, DIM = 2, 3, 8


def observed_recorder() -> tuple[KVRangeRecorder, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    recorder = KVRangeRecorder(LAYERS, HEADS, DIM)
    seen = []
    for layer in range(LAYERS):
        for _batch in range(2):
            key, value = torch.randn(2, HEADS, 5, DIM) * 3, torch.randn(2, HEADS, 5, DIM)
            key[..., 0] += 20  # an outlier channel, as keys after RoPE have
            recorder.observe(layer, key, value)
            seen.append((key, value))
    return recorder, seen


def test_ranges_are_per_channel_over_all_batches():
    recorder, seen = observed_recorder()
    layer0_keys = torch.cat([k for k, _ in seen[:2]], dim=0)  # [4, heads, 5, dim]
    torch.testing.assert_close(recorder.k_max[0], layer0_keys.amax(dim=(0, 2)))
    torch.testing.assert_close(recorder.k_min[0], layer0_keys.amin(dim=(0, 2)))
    assert recorder.k_min.shape == (LAYERS, HEADS, DIM)


def test_per_channel_tables_keep_the_outlier_channel_from_flattening_the_others():
    recorder, _ = observed_recorder()
    scale = recorder.tables(4)["k_scale"]  # [layers, heads, dim]
    # channel 0 is shifted by +20 but not wider, so its step matches the others'
    assert scale[..., 0].mean() < 1.5 * scale[..., 1:].mean()
    per_head_step = (recorder.k_max.amax(-1) - recorder.k_min.amin(-1)) / 15
    assert (scale.amax(-1) < per_head_step).all()


def test_saved_tables_round_trip_through_load(tmp_path):
    recorder, _ = observed_recorder()
    recorder.save(tmp_path)
    saved = json.loads((tmp_path / KV_SCALES_FILE).read_text())
    assert saved["version"] == 2 and saved["granularity"] == "channel"
    for bits in (8, 4):
        loaded = load_kv_scales(tmp_path, bits)
        expected = recorder.tables(bits)
        for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
            torch.testing.assert_close(getattr(loaded, name), expected[name])
    k_min, k_max = torch.tensor(saved["ranges"]["k_min"]), torch.tensor(saved["ranges"]["k_max"])
    int8 = load_kv_scales(tmp_path, 8)  # one range per head, spread over its channels
    torch.testing.assert_close(int8.k_zero, k_min.amin(-1, keepdim=True).expand_as(k_min))
    torch.testing.assert_close(int8.k_scale * 255 + int8.k_zero, k_max.amax(-1, keepdim=True).expand_as(k_max))
    int4 = load_kv_scales(tmp_path, 4)  # per channel, widened on both sides
    span = k_max - k_min
    torch.testing.assert_close(int4.k_zero, k_min - INT4_RANGE_MARGIN * span)
    torch.testing.assert_close(int4.k_scale * 15, span * (1 + 2 * INT4_RANGE_MARGIN))


def test_version_1_per_head_files_still_load(tmp_path):
    table = {name: [[0.5] * HEADS] * LAYERS for name in ("k_scale", "k_zero", "v_scale", "v_zero")}
    (tmp_path / KV_SCALES_FILE).write_text(json.dumps({"format": "lmc-kv-cache-scales", "version": 1,
                                                       "int8": table, "int4": table}))
    assert load_kv_scales(tmp_path, 4).k_scale.shape == (LAYERS, HEADS)


def test_unfinished_calibration_is_refused():
    recorder = KVRangeRecorder(LAYERS, HEADS, DIM)
    recorder.observe(0, torch.randn(1, HEADS, 2, DIM), torch.randn(1, HEADS, 2, DIM))
    with pytest.raises(LmcError, match="did not finish"):
        recorder.to_json()


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(LmcError, match="run `lmc quantize`"):
        load_kv_scales(tmp_path, 8)
