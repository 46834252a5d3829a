"""Seeded, deterministic task generators: long-context (RULER-style), algorithmic (NTM / DNC),
few-shot (MANN), knowledge tracing (DKVMN) and retrieval. One module per family."""
