"""Run modes: how a manifest's jobs reach their providers (sync, provider batches)."""
