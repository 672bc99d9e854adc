"""Device time of kernel launches as a decode step runs them: captured into one CUDA graph and replayed, so
no Python launch cost is counted (the sweep scripts in this folder use it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lmcompress.turbo.bench_kernels import capture_graph, replay_ms


def graph_us(calls: Sequence[Callable[[], object]], replays: int) -> float:
    """Mean device microseconds of one call when all of `calls` are replayed from one CUDA graph (warmed up
    once, and replayed once untimed: the first replay uploads the graph)."""
    graph = capture_graph(lambda: [call() for call in calls], times=1, warmups=1)
    replay_ms(graph)
    return replay_ms(graph, replays) * 1e3 / (replays * len(calls))
