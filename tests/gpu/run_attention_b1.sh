#!/usr/bin/env bash
# Decode attention for few sequences (batch 1-16, MHA): the launch grid with the L2 flushed before each call,
# short and long contexts under one table width (a captured graph serves every length up to max_model_len).
source tests/gpu/common.sh
timeout 300 python3 tests/gpu/attention_sweep.py $OUT/attention_b1.json --flushed --max-model-len 32768 \
  --cases 1x192 1x384 1x4096 1x32768 16x4096 --kv bfloat16 int8 --block-n 16 32 64 --partitions 4 8 16 32 64 \
  --warps 2 4 > $OUT/attention_b1.txt 2>&1 || echo "sweep rc=$?"
grep "None" $OUT/attention_b1.txt
python3 - $OUT/attention_b1.json <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "us" in r]
for kv in ("bfloat16", "int8"):
    for case in sorted({(r["batch"], r["context"]) for r in rows}):
        mine = sorted((r for r in rows if r["kv"] == kv and (r["batch"], r["context"]) == case), key=lambda r: r["us"])
        print(kv, case, " | ".join(f"{r['us']:.1f} {r['launch'][12:]}" for r in mine[:3]))
PY
step "sweep"
cd $OUT && tar czf all.tgz *.json *.txt
