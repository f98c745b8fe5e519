"""``rmsnorm bench``: providers, timing, sweeps and reports (JSONL, CSV, Markdown, PNG)."""
