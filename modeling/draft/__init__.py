"""The EAGLE-3 draft: model, config, draft vocab, snapshots (weights + vocab + config) and the TTT loss."""
