"""`lmc report`: every compression method side by side, accuracy cost against memory saving.

    matrix.py   the cells (method x KV dtype), their settings and resumable execution
    engines.py  the runtime that scores a cell: turbo, or transformers for bitsandbytes weights
    bnb.py      bitsandbytes NF4 / int8 baselines through transformers' BitsAndBytesConfig
    memory.py   weight bytes, KV bytes per token, sequences that fit on a GPU
    tasks.py    multiple-choice tasks scored by log-likelihood; the built-in held-out task
    render.py   report.md, report.json, report.html and the accuracy-against-memory plot
    provenance.py  versions, device, exact commands and the fingerprints that make cells reusable
    files.py    atomic file writes
"""
