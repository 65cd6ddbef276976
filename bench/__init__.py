"""Scoring: lm-eval quality on an offline task suite, plus measured throughput, latency and memory."""
