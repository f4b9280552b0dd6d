"""Foundations: durable writes, manifests, shards, locks, crash points, config, progress, the stage shell."""
