"""Using a target checkpoint through its family: stage 2's capture hooks (capture), the benchmark's
tie-aware lossless check (tie_check), training's frozen-table reader (weights)."""
