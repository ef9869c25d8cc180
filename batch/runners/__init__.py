"""Run modes: how a manifest's jobs reach their providers (sync engine, provider batches, clusters)."""
