"""Reading a hub's Prometheus metrics in the lab's scenarios and benches."""

from __future__ import annotations

import httpx


def metric_sum(text: str, series: str) -> float:
    """The sum of the samples whose line starts with `series` (a name, or a name and the
    start of its labels, e.g. 'ehi_hub_bad_messages_total{reason="queue_full"')."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(series) and line[len(series)] in " {,":
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of the labelled metric `name`: (its labels, its value)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels_text, value = line[len(name) + 1:].rsplit("} ", 1)
        labels = dict(kv.split("=", 1) for kv in labels_text.split(",") if "=" in kv)
        out.append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    return out


def scrape(url: str, series: str) -> float:
    """`metric_sum` of the hub at `url` now; 0 if it does not answer."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return metric_sum(text, series)
