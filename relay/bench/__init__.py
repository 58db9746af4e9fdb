"""Benchmark tools: ``relay bench`` (SMTP load generator) and ``relay sink`` (counting sink)."""
