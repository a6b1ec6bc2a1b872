"""/metrics in the Prometheus text exposition format (version 0.0.4), from the engine's stats snapshot."""

from __future__ import annotations

# stats key -> (metric name, type, help)
_METRICS = [
    ("queue_depth", "ringlinear_queue_depth", "gauge", "Requests waiting for a state slot."),
    ("running", "ringlinear_running_requests", "gauge", "Requests holding a state slot."),
    ("tokens_per_second", "ringlinear_tokens_per_second", "gauge", "Prompt + generated tokens per second over the last 10 s."),
    ("prompt_tokens_total", "ringlinear_prompt_tokens_total", "counter", "Prompt tokens of admitted requests."),
    ("prefill_tokens_computed_total", "ringlinear_prefill_tokens_computed_total", "counter", "Prompt tokens actually prefilled (cache hits excluded)."),
    ("generation_tokens_total", "ringlinear_generation_tokens_total", "counter", "Generated tokens."),
    ("prefix_cache_lookups", "ringlinear_prefix_cache_lookups_total", "counter", "Prefix-state cache lookups."),
    ("prefix_cache_hits", "ringlinear_prefix_cache_hits_total", "counter", "Prefix-state cache hits."),
    ("prefix_cache_hit_rate", "ringlinear_prefix_cache_hit_rate", "gauge", "Hits / lookups of the prefix-state cache."),
    ("prefix_cache_tokens_saved", "ringlinear_prefix_cache_tokens_saved_total", "counter", "Prompt tokens skipped thanks to the prefix-state cache."),
    ("prefix_cache_entries", "ringlinear_prefix_cache_entries", "gauge", "Snapshots held by the prefix-state cache."),
    ("memory_in_use_bytes", "ringlinear_memory_in_use_bytes", "gauge", "State slots, KV blocks and prefix snapshots in use."),
    ("memory_budget_bytes", "ringlinear_memory_budget_bytes", "gauge", "The configured memory budget (weights excluded)."),
    ("slots_used", "ringlinear_state_slots_used", "gauge", "Linear-state slots in use."),
    ("slots_total", "ringlinear_state_slots_total", "gauge", "Linear-state slots."),
    ("kv_blocks_used", "ringlinear_kv_blocks_used", "gauge", "Paged KV blocks in use (requests and prefix snapshots)."),
    ("kv_blocks_total", "ringlinear_kv_blocks_total", "gauge", "Paged KV blocks."),
    ("steps_total", "ringlinear_engine_steps_total", "counter", "Engine steps run."),
]


def render(stats: dict, rejected: dict[str, int], device_bytes: int | None) -> str:
    lines = []
    for key, name, kind, help_ in _METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_num(stats.get(key, 0))}"]
    lines += ["# HELP ringlinear_requests_rejected_total Requests refused before running, by reason.",
              "# TYPE ringlinear_requests_rejected_total counter"]
    for reason, n in sorted(rejected.items()):
        lines.append(f'ringlinear_requests_rejected_total{{reason="{reason}"}} {n}')
    if device_bytes is not None:
        lines += ["# HELP ringlinear_device_memory_allocated_bytes Device memory allocated by torch (weights included).",
                  "# TYPE ringlinear_device_memory_allocated_bytes gauge", f"ringlinear_device_memory_allocated_bytes {device_bytes}"]
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))
